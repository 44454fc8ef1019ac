"""Evaluation suites: `igrpo eval CONFIG --suite paper --checkpoint A [--checkpoint B]`.

The paper's protocol (arXiv 2602.09000, "Evaluation"): single-shot prompts (no draft), temperature
0.6, top-p 0.95, Pass@1 averaged over 64 samples for AIME 2024/2025 and 8 for the others, on
AIME25, AIME24, MATH500, AMC, GSM8K and Minerva, reported in that column order with their average.
The benchmarks are the JSONL files `igrpo data prepare` writes, one per benchmark, named by it
(`<data dir>/aime25.jsonl`, ...). With two checkpoints the table holds both rows and their
difference (second minus first), on the same problems and the same sampling seeds.

Generation, prompts, scoring and Pass@k are evaluate.py's (EvalModel, evaluate): the suite only
chooses the benchmarks, the sampling settings and the layout of the table. A suite other than the
paper's is a YAML file:

    name: quick
    temperature: 0.6
    top_p: 0.95
    benchmarks:
      - {name: math500, num_samples: 4}
      - {name: gsm8k, num_samples: 1, file: /data/gsm8k_small.jsonl}   # file: optional
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.config.schema import EvalConfig
from nemo_igrpo.evaluation.evaluate import EvalModel, EvalResult
from nemo_igrpo.utils.errors import UserError

DEFAULT_DATA_DIR = "data/benchmarks"  # relative to the working directory; IGRPO_BENCHMARK_DIR overrides


@dataclass
class SuiteBenchmark:
    name: str  # file stem, and the NAME of `igrpo data prepare NAME`
    title: str  # column header
    num_samples: int  # Pass@1 is averaged over this many samples per problem
    file: Optional[str] = None  # explicit location; default <data dir>/<name>.jsonl


@dataclass
class EvalSuite:
    name: str
    benchmarks: list[SuiteBenchmark]
    temperature: float = 0.6
    top_p: float = 0.95
    # Where the protocol was changed from the suite's definition (--samples, --benchmarks), so a
    # reduced run is never mistaken for the paper's numbers.
    deviations: list[str] = field(default_factory=list)


def paper_suite() -> EvalSuite:
    """The paper's table: its column order, its sample counts."""
    return EvalSuite(
        "paper",
        [
            SuiteBenchmark("aime25", "AIME25", 64),
            SuiteBenchmark("aime24", "AIME24", 64),
            SuiteBenchmark("math500", "MATH500", 8),
            SuiteBenchmark("amc23", "AMC", 8),
            SuiteBenchmark("gsm8k", "GSM8K", 8),
            SuiteBenchmark("minerva_math", "Minerva", 8),
        ],
    )


SUITES = {"paper": paper_suite}


def load_suite(name_or_path: str) -> EvalSuite:
    if name_or_path in SUITES:
        return SUITES[name_or_path]()
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise UserError(f"--suite {name_or_path}: neither a known suite ({', '.join(SUITES)}) nor a suite YAML file")
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the suite ({one_line(e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list) or not doc["benchmarks"]:
        raise UserError(f"{path}: a suite needs a non-empty 'benchmarks' list")
    unknown = set(doc) - {"name", "temperature", "top_p", "benchmarks"}
    if unknown:
        raise UserError(f"{path}: unknown suite key(s) {sorted(unknown)} (known: name, temperature, top_p, benchmarks)")
    benchmarks = []
    for i, b in enumerate(doc["benchmarks"]):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            raise UserError(f"{path}: benchmarks[{i}]: expected a mapping with a 'name'")
        extra = set(b) - {"name", "title", "num_samples", "file"}
        if extra:
            raise UserError(
                f"{path}: benchmarks[{i}]: unknown key(s) {sorted(extra)} (known: name, title, num_samples, file)"
            )
        n = b.get("num_samples", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"{path}: benchmarks[{i}].num_samples: must be an integer >= 1, got {n!r}")
        file = b.get("file")
        if file is not None and not Path(file).is_absolute():
            file = str(path.parent / file)  # relative to the suite file, not the working directory
        benchmarks.append(SuiteBenchmark(b["name"], str(b.get("title", b["name"])), n, file))
    suite = EvalSuite(
        str(doc.get("name", path.stem)),
        benchmarks,
        temperature=float(doc.get("temperature", 0.6)),
        top_p=float(doc.get("top_p", 0.95)),
    )
    if not suite.temperature >= 0 or not 0 < suite.top_p <= 1:
        raise UserError(f"{path}: temperature must be >= 0 and top_p in (0, 1]")
    return suite


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def apply_options(suite: EvalSuite, *, samples: Sequence[str] = (), only: Optional[str] = None) -> EvalSuite:
    """--benchmarks a,b (a subset, kept in the suite's order) and --samples N | NAME=N."""
    suite = dataclasses.replace(
        suite, benchmarks=[dataclasses.replace(b) for b in suite.benchmarks], deviations=list(suite.deviations)
    )
    names = [b.name for b in suite.benchmarks]
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise UserError(f"--benchmarks: {', '.join(unknown)} not in suite '{suite.name}' ({', '.join(names)})")
        suite.benchmarks = [b for b in suite.benchmarks if b.name in wanted]
        suite.deviations.append(f"benchmarks {','.join(b.name for b in suite.benchmarks)} only")
    original = {b.name: b.num_samples for b in suite.benchmarks}
    # A plain N applies to every benchmark and NAME=N to one, whatever their order on the line.
    parsed = []
    for spec in samples:
        target, _, count = spec.rpartition("=")
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--samples {spec}: expected N or NAME=N with N >= 1")
        if target and target not in original:
            raise UserError(f"--samples {spec}: no benchmark '{target}' in the suite ({', '.join(original)})")
        parsed.append((target, n))
    for target, n in sorted(parsed, key=lambda t: bool(t[0])):
        for b in suite.benchmarks:
            if not target or b.name == target:
                b.num_samples = n
    for b in suite.benchmarks:
        if b.num_samples != original[b.name]:
            suite.deviations.append(f"{b.name}: {b.num_samples} samples instead of {original[b.name]}")
    return suite


def benchmark_files(suite: EvalSuite, data_dir: str | os.PathLike) -> list[Path]:
    """Each benchmark's file; every missing one is reported at once, before any model loads."""
    files = [Path(b.file) if b.file else Path(data_dir) / f"{b.name}.jsonl" for b in suite.benchmarks]
    missing = [(b, f) for b, f in zip(suite.benchmarks, files) if not f.is_file()]
    if missing:
        hints = "; ".join(f"{f} (igrpo data prepare {b.name} SRC {Path(data_dir)})" for b, f in missing)
        raise UserError(f"suite '{suite.name}': benchmark file(s) missing: {hints}")
    return files


@dataclass
class SuiteRow:
    label: str
    checkpoint: str
    results: dict[str, EvalResult]  # by benchmark name
    average: float  # mean of the benchmarks' Pass@1 (the paper's 'average' column)


@dataclass
class SuiteReport:
    suite: EvalSuite
    rows: list[SuiteRow]
    settings: dict
    seconds: float

    def difference(self) -> Optional[dict[str, float]]:
        """Second row minus first, per benchmark and for the average (two checkpoints only)."""
        if len(self.rows) != 2:
            return None
        a, b = self.rows
        diff = {name: b.results[name].accuracy - a.results[name].accuracy for name in a.results}
        diff["average"] = b.average - a.average
        return diff

    def table(self) -> str:
        """The paper's layout: one row per model, Pass@1 in %, the suite's column order."""
        head = ["model"] + [b.title for b in self.suite.benchmarks] + ["Average"]
        rows = [head]
        for r in self.rows:
            rows.append(
                [r.label]
                + [f"{100 * r.results[b.name].accuracy:.2f}" for b in self.suite.benchmarks]
                + [f"{100 * r.average:.2f}"]
            )
        diff = self.difference()
        if diff is not None:
            rows.append(
                [f"{self.rows[1].label} - {self.rows[0].label}"]
                + [f"{100 * diff[b.name]:+.2f}" for b in self.suite.benchmarks]
                + [f"{100 * diff['average']:+.2f}"]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
        ]
        return "\n".join([self.protocol_line(), *lines])

    def markdown(self) -> str:
        head = ["model"] + [b.title for b in self.suite.benchmarks] + ["Average"]
        out = [f"<!-- {self.protocol_line()} -->", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            out.append(
                "| "
                + " | ".join(
                    [r.label]
                    + [f"{100 * r.results[b.name].accuracy:.2f}" for b in self.suite.benchmarks]
                    + [f"{100 * r.average:.2f}"]
                )
                + " |"
            )
        diff = self.difference()
        if diff is not None:
            out.append(
                "| "
                + " | ".join(
                    [f"{self.rows[1].label} - {self.rows[0].label}"]
                    + [f"{100 * diff[b.name]:+.2f}" for b in self.suite.benchmarks]
                    + [f"{100 * diff['average']:+.2f}"]
                )
                + " |"
            )
        return "\n".join(out) + "\n"

    def protocol_line(self) -> str:
        samples = ", ".join(f"{b.title} {b.num_samples}" for b in self.suite.benchmarks)
        line = (
            f"suite {self.suite.name}: Pass@1 (%) single-shot, T={self.suite.temperature:g}, "
            f"top-p={self.suite.top_p:g}, max {self.settings['max_new_tokens']} new tokens; samples: {samples}"
        )
        if self.suite.deviations:
            line += "; NOT the suite's protocol: " + "; ".join(self.suite.deviations)
        return line

    def as_dict(self) -> dict:
        return {
            "suite": self.suite.name,
            "protocol": self.protocol_line(),
            "settings": self.settings,
            "benchmarks": [dataclasses.asdict(b) for b in self.suite.benchmarks],
            "deviations": self.suite.deviations,
            "rows": [
                {
                    "label": r.label,
                    "checkpoint": r.checkpoint,
                    "average": r.average,
                    "results": {k: dataclasses.asdict(v) for k, v in r.results.items()},
                }
                for r in self.rows
            ],
            "difference": self.difference(),
            "seconds": self.seconds,
        }


def _labels(checkpoints: Sequence[str], labels: Optional[Sequence[str]]) -> list[str]:
    if labels:
        if len(labels) != len(checkpoints):
            raise UserError(f"--labels: {len(labels)} label(s) for {len(checkpoints)} checkpoint(s)")
        return list(labels)
    names = [Path(c).name or str(c) for c in checkpoints]
    if len(set(names)) < len(names):  # runs/a/hf and runs/b/hf: use the parent too
        names = [f"{Path(c).parent.name}/{Path(c).name}" for c in checkpoints]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def run_suite(
    cfg,
    suite: EvalSuite,
    checkpoints: Sequence[str],
    *,
    data_dir: str | os.PathLike,
    labels: Optional[Sequence[str]] = None,
) -> SuiteReport:
    """Evaluate one or two checkpoints on every benchmark of `suite` (the library entry point)."""
    from nemo_igrpo.data.datasets import load_problems
    from nemo_igrpo.rewards.manager import RewardManager

    if not 1 <= len(checkpoints) <= 2:
        raise UserError(f"the suite compares one or two checkpoints side by side, got {len(checkpoints)}")
    names = _labels(checkpoints, labels)
    files = benchmark_files(suite, data_dir)
    # Every file is read and checked before the first model loads: a bad row costs a second.
    sets = [
        load_problems(f, cfg.data.prompt_key, cfg.data.answer_key, split="test", limit=cfg.data.max_eval_samples)
        for f in files
    ]
    if cfg.data.max_eval_samples is not None:
        suite.deviations.append(f"at most {cfg.data.max_eval_samples} problems per benchmark (data.max_eval_samples)")
    max_new_tokens = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    start = time.time()
    rows = []
    with RewardManager(cfg.reward) as rewards:
        for checkpoint, label in zip(checkpoints, names):
            results: dict[str, EvalResult] = {}
            with EvalModel(cfg, checkpoint) as model:
                for bench, problems in zip(suite.benchmarks, sets):
                    eval_cfg = EvalConfig(
                        num_samples=bench.num_samples,
                        temperature=suite.temperature,
                        top_p=suite.top_p,
                        max_new_tokens=cfg.eval.max_new_tokens,
                        pass_k=sorted({1, *(k for k in cfg.eval.pass_k if k <= bench.num_samples)}),
                    )
                    results[bench.name] = model.evaluate(rewards, problems, eval_cfg, bench.name)
            average = sum(r.accuracy for r in results.values()) / len(results)
            rows.append(SuiteRow(label, str(checkpoint), results, average))
    settings = {
        "temperature": suite.temperature,
        "top_p": suite.top_p,
        "max_new_tokens": max_new_tokens,
        "seed": cfg.seed,
        "backend": cfg.generation.backend,
        "num_samples": {b.name: b.num_samples for b in suite.benchmarks},
        "files": {b.name: str(f) for b, f in zip(suite.benchmarks, files)},
    }
    return SuiteReport(suite, rows, settings, time.time() - start)


def write_report(report: SuiteReport, out: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON report at `out` and the markdown table next to it (same stem, .md)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    md = out.with_suffix(".md")
    md.write_text(report.markdown())
    return out, md


def run_suite_cli(args) -> int:
    from nemo_igrpo.config import load_config

    if args.benchmark:
        raise UserError(
            "--benchmark and --suite do not combine: a suite names its own benchmarks "
            "(use --benchmarks a,b to run some of them)"
        )
    suite = apply_options(load_suite(args.suite), samples=args.samples or (), only=args.benchmarks)
    cfg = load_config(args.config, args.overrides)
    from nemo_igrpo.evaluation.evaluate import _checkpoints

    checkpoints = _checkpoints(args) or ([cfg.policy.model.hf_path] if cfg.policy.model.hf_path else [])
    if not checkpoints:
        raise UserError("no model: pass --checkpoint (once, or twice for a side-by-side) or set policy.model.hf_path")
    data_dir = args.data_dir or os.environ.get("IGRPO_BENCHMARK_DIR") or DEFAULT_DATA_DIR
    from nemo_igrpo.utils import console

    # Like train and eval: the project's lines on the terminal, the engines' output in the logs.
    mode = console.resolve_mode(cfg.logging.console, getattr(args, "verbose", False))
    with console.session(cfg.run.dir, mode, "eval"):
        report = run_suite(cfg, suite, checkpoints, data_dir=data_dir, labels=args.labels)
        console.echo(report.table())
        out = Path(args.output) if args.output else Path(cfg.run.dir) / "eval" / f"suite_{suite.name}.json"
        json_path, md_path = write_report(report, out)
        console.echo(f"wrote {json_path} and {md_path}")
    return 0
