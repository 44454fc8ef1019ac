"""How an assert-style reference is judged without trusting the solution's interpreter.

A test `assert E` is split in two:
- the *probes*: the sub-expressions of E that need the solution (a call, attribute or index
  chain rooted at a name the reference does not define itself, e.g. `add(1, 2)`,
  `Solution().f(x)[0]`, or a comprehension that uses one). Only these run in the solution's
  sandbox, and only their values (plain data, rewards/_sandbox_runner.py `encode`) come back;
- the rest of E with each probe replaced by a placeholder name. The parent evaluates it itself
  when it is made of literals, placeholders, comparisons, `not`/`and`/`or` and unary minus
  (`assert add(1, 2) == 3`, `assert not is_prime(8)`); anything else (`isinstance(...)`,
  `math.isclose(...)`, a setup variable) runs in a second sandbox that holds only the
  reference's own code and the probe values, never the solution.

Expected values therefore never enter the solution's sandbox, and nothing the solution does to
builtins, the test's helpers or its channel changes how the parent compares. What the solution
controls is the value of its own calls, as it should.

Setup statements that use a solution name (`s = Stack()`, `def helper(x): return add(x, 1)`)
run only in the solution's sandbox and make the names they bind solution names too; the others
run in the reference sandbox, and in the solution's when a probe needs a name they bind.
"""

from __future__ import annotations

import ast
import builtins
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_BUILTIN_NAMES = frozenset(dir(builtins))
PLACEHOLDER = "__igrpo_v{}__"


def _bound(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for alias in n.names:
                names.add("*" if alias.name == "*" else (alias.asname or alias.name).split(".")[0])
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
    return names


def _loaded(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _free(node: ast.AST) -> set[str]:
    # Approximate free names: loaded and not bound anywhere inside (arguments, comprehension
    # variables, locals). Good enough to tell reference names from solution names.
    return _loaded(node) - _bound(node)


@dataclass
class TestPlan:
    step_index: int  # position among the reference's steps (result lines name it)
    probes: list[int]  # ids of the values this test needs (a missing one fails it)
    expr: Optional[ast.expr]  # the test's asserts with probes replaced by placeholders; None: no assert
    local: bool  # the parent can evaluate `expr` itself
    broken: Optional[str] = None  # the test is not valid Python: it fails, as exec-ing it would


@dataclass
class Plan:
    solution_steps: list = field(default_factory=list)  # ["exec", src] | ["eval", probe_id, src]
    judge_steps: list = field(default_factory=list)  # ["exec", src] | ["judge", test_id, src]
    tests: list[TestPlan] = field(default_factory=list)

    @property
    def needs_judge_sandbox(self) -> bool:
        return any(not t.local for t in self.tests)


class _Lifter:
    """Replaces the solution-dependent sub-expressions of one test by placeholders.

    Builtin names in a test are always the real builtins (evaluated by the parent or the
    reference sandbox): a solution that redefines `sorted` or `len` changes nothing there. The
    price: a task whose function is named like a builtin (`max`) needs the fn_name format."""

    def __init__(self, solution_names: set[str], probes: list[str]):
        self.solution_names = solution_names
        self.probes = probes

    def mentions(self, node: ast.AST) -> bool:
        return bool(_free(node) & self.solution_names)

    def probe(self, node: ast.expr) -> ast.Name:
        if isinstance(node, ast.GeneratorExp):
            # Materialised inside the sandbox: a generator is not a value that can travel.
            node = ast.ListComp(elt=node.elt, generators=node.generators)
        self.probes.append(ast.unparse(node))
        return ast.Name(id=PLACEHOLDER.format(len(self.probes) - 1), ctx=ast.Load())

    def lift(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.lift(x) for x in node]
        if not isinstance(node, ast.AST) or not self.mentions(node):
            return node
        if isinstance(node, ast.Name):
            return self.probe(node)
        if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
            head = node.func if isinstance(node, ast.Call) else node.value
            if self.mentions(head):
                return self.probe(node)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.NamedExpr)):
            # Names bound inside would be cut off from their binding: evaluate the whole thing.
            return self.probe(node)
        new = type(node)()
        for name, value in ast.iter_fields(node):
            setattr(new, name, self.lift(value))
        return ast.copy_location(new, node)


def plan_asserts(steps: list[tuple[str, str]]) -> tuple[Plan, list[str]]:
    """(plan, probe sources) for steps ("setup" | "test", source) from `code.parse_tests`.

    A test step may hold several statements: its asserts must all hold, its other statements
    run like setup, and a test without any assert passes when its statements run without error."""
    plan = Plan()
    probes: list[str] = []
    reference_names: set[str] = set()
    solution_bound: set[str] = set()  # names bound by setup that used the solution

    def solution_names_in(node: ast.AST) -> set[str]:
        return {n for n in _free(node) if n in solution_bound or (n not in reference_names and n not in _BUILTIN_NAMES)}

    # ("trusted", (tree, src, bound)) | ("tainted", src) | ("probe", id) in the solution's order.
    solution_order: list[tuple[str, Any]] = []
    needed: set[str] = set()

    def add_setup(stmt: ast.AST, source: str) -> None:
        nonlocal reference_names, solution_bound, needed
        bound = _bound(stmt)
        if solution_names_in(stmt) and "*" not in bound:
            solution_bound |= bound
            reference_names -= bound
            solution_order.append(("tainted", source))
            needed |= _free(stmt)
        else:
            reference_names |= bound
            solution_bound -= bound
            solution_order.append(("trusted", (stmt, source, bound)))
            plan.judge_steps.append(["exec", source])

    def add_probe(source: str) -> int:
        probes.append(source)
        pid = len(probes) - 1
        needed.update(_free(ast.parse(source, mode="eval")))
        solution_order.append(("probe", pid))
        return pid

    for step_index, (kind, source) in enumerate(steps):
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            if kind == "test":
                plan.tests.append(TestPlan(step_index, [], None, True, f"not valid Python: {e.msg}"))
                continue
            raise ValueError(f"code_tests: reference setup is not valid Python ({e.msg}, line {e.lineno})") from None
        if kind != "test":
            # One statement at a time: `expected = 11` next to `s = Stack()` stays the reference's.
            for stmt in tree.body:
                add_setup(stmt, ast.unparse(stmt))
            continue
        exprs: list[ast.expr] = []
        test_probes: list[int] = []
        if not any(isinstance(stmt, ast.Assert) for stmt in tree.body):
            # No assert: the test is "its statements run without error", reported by the
            # solution's run itself (so it checks nothing a solution could not fake anyway).
            probes.append(source)
            test_probes.append(len(probes) - 1)
            needed.update(_free(tree))
            solution_bound.update(_bound(tree))
            reference_names.difference_update(_bound(tree))
            solution_order.append(("run", len(probes) - 1))
            plan.tests.append(TestPlan(step_index, test_probes, None, True))
            continue
        for stmt in tree.body:
            if not isinstance(stmt, ast.Assert):
                add_setup(stmt, ast.unparse(stmt))
                continue
            first = len(probes)
            lifted = _Lifter(solution_names_in(stmt.test), probes).lift(stmt.test)
            lifted_sources = probes[first:]
            del probes[first:]
            for probe_source in lifted_sources:
                test_probes.append(add_probe(probe_source))
            exprs.append(ast.fix_missing_locations(lifted))
        expr = exprs[0] if len(exprs) == 1 else ast.BoolOp(op=ast.And(), values=exprs)
        test_id = len(plan.tests)
        test = TestPlan(step_index, test_probes, expr, _is_local(expr))
        plan.tests.append(test)
        if not test.local:
            plan.judge_steps.append(["judge", test_id, ast.unparse(expr)])
    # Trusted setup goes into the solution's run only when something there needs a name it binds
    # (an expected value kept in a setup variable stays out of the solution's reach). Walking
    # back lets a statement's own needs pull in the statements before it.
    include: set[int] = set()
    for i in range(len(solution_order) - 1, -1, -1):
        kind, item = solution_order[i]
        if kind == "trusted":
            stmt, _, bound = item
            if bound & needed or "*" in bound:
                include.add(i)
                needed |= _free(stmt)
    for i, (kind, item) in enumerate(solution_order):
        if kind == "tainted":
            plan.solution_steps.append(["exec", item])
        elif kind == "trusted" and i in include:
            plan.solution_steps.append(["exec", item[1]])
        elif kind == "probe":
            plan.solution_steps.append(["eval", item, probes[item]])
        elif kind == "run":
            plan.solution_steps.append(["run", item, probes[item]])
    return plan, probes


_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def _is_local(node: ast.AST) -> bool:
    """True if `evaluate` handles every node of this expression."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id.startswith("__igrpo_v")
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_local(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_local(k) for k in node.keys) and all(_is_local(v) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)) and _is_local(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(_is_local(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return (
            all(type(op) in _COMPARE for op in node.ops)
            and _is_local(node.left)
            and all(_is_local(c) for c in node.comparators)
        )
    return False


def evaluate(node: ast.AST, values: dict[str, Any]) -> Any:
    """Evaluate a `_is_local` expression on plain values, in this process, without user code."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]  # KeyError: that probe has no value, the test fails
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [evaluate(e, values) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        return {evaluate(k, values): evaluate(v, values) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        operand = evaluate(node.operand, values)
        return {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)](operand)
    if isinstance(node, ast.BoolOp):
        result: Any = None
        for value_node in node.values:
            result = evaluate(value_node, values)
            if isinstance(node.op, ast.And) and not result:
                return result
            if isinstance(node.op, ast.Or) and result:
                return result
        return result
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = evaluate(comparator, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"not evaluable in the parent: {type(node).__name__}")


def judge_locally(test: TestPlan, values: dict[str, Any]) -> tuple[bool, Optional[str]]:
    """(passed, reason) for a local test given the probes' decoded values."""
    try:
        passed = bool(evaluate(test.expr, values))
        return passed, None if passed else "the assertion does not hold"
    except KeyError:
        return False, "a value the test needs was not produced"
    except Exception as e:  # noqa: BLE001 - e.g. comparing a list with an int, as the assert would
        return False, f"{type(e).__name__}: {str(e)[:100]}"
