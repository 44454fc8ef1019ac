"""Run megatron-core 0.19 (and megatron-bridge) on a machine without CUDA.

megatron-core is written for GPUs: it asks `torch.cuda` for the current device, the RNG state,
streams and events, and creates a few tensors with ``device="cuda"``. None of that is needed for
the *math* (TP/PP/DP collectives run fine over gloo), so on a CPU-only machine this module
redirects exactly those calls to their CPU equivalents. Everything here is inert when
``torch.cuda.is_available()`` is True: a GPU run executes unmodified megatron-core.

Two layers, both explicit:

1. ``enable()``: process-wide replacements of ``torch.cuda`` functions that *raise* on a machine
   without CUDA (so no working code can change behaviour), plus megatron's two RNG helpers.
   Idempotent; ``disable()`` restores every original (tests use it).
2. ``cuda_to_cpu()``: a context manager with a torch function mode that rewrites
   ``device="cuda"`` / ``.cuda()`` to the CPU and makes ``Tensor.type()`` report the
   ``torch.cuda.*`` name megatron asserts on. It is scoped (the actor enters it around its
   megatron calls) so that other code in the process (vLLM, transformers) never pays for it.

Plus ``register_transformer_engine_stub()`` for megatron-bridge's unconditional TE import.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
# (owner object, attribute name, original value) of every replacement made by enable().
_saved: list[tuple[Any, str, Any]] = []
_enabled = False


def is_needed() -> bool:
    """True on a machine without CUDA: the only case where anything here is switched on."""
    return not torch.cuda.is_available()


def is_enabled() -> bool:
    return _enabled


# ---------------------------------------------------------------------------------------------
# Stand-ins for CUDA streams and events. On the CPU every op is synchronous, so "wait for a
# stream/event" is already satisfied and recording is meaningless.
# ---------------------------------------------------------------------------------------------


class _CpuStream:
    """Accepts what megatron does with a `torch.cuda.Stream`: wait_stream / wait_event /
    record_event / synchronize (DDP's communication stream, param_and_grad_buffer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_CpuEvent":
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)


class _CpuEvent:
    """Accepts what megatron does with a `torch.cuda.Event`: record / wait / synchronize."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CURRENT_STREAM = _CpuStream()


def _current_device() -> torch.device:
    return _CPU


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _replace(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


class _RepeatedCpuRngWarning(logging.Filter):
    """megatron's RNG tracker warns "CPU RNG state changed within GPU RNG context" whenever a
    random op runs inside `tracker.fork()`. With the tracker mapped onto the CPU generator that
    change is the intended effect (weight init and dropout draw from the forked state), so the
    message carries no information here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_rng_filter = _RepeatedCpuRngWarning()


def enable() -> bool:
    """Install the process-wide CPU redirections if CUDA is absent. Returns whether they are on.

    Safe to call any number of times. Imports megatron.core (it patches two of its functions).
    """
    global _enabled
    if _enabled or not is_needed():
        return _enabled
    import megatron.core.tensor_parallel.random as mrandom

    # torch.cuda.current_device(): ~200 call sites in megatron-core use it as the device for new
    # tensors and modules (RotaryEmbedding's inv_freq, DDP buffers, dist-checkpointing, p2p
    # shape tensors). Returning the CPU device places them where the model lives.
    _replace(torch.cuda, "current_device", _current_device)
    # torch.cuda.get_rng_state / set_rng_state / manual_seed: CudaRNGStatesTracker.add() and
    # model_parallel_cuda_manual_seed() seed and snapshot the "cuda" generator so TP ranks draw
    # different dropout / init values and DP ranks the same. On the CPU the generator that
    # actually drives dropout and init is torch's default CPU generator, so the tracker manages
    # that one (real semantics, not a no-op).
    _replace(torch.cuda, "get_rng_state", _cpu_get_rng_state)
    _replace(torch.cuda, "set_rng_state", _cpu_set_rng_state)
    _replace(torch.cuda, "manual_seed", _cpu_manual_seed)
    # megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state: the
    # tracker's fork() and activation recomputation (CheckpointFunction) go through these two
    # helpers, which read torch.cuda.default_generators directly; same redirection as above.
    _replace(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
    _replace(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
    # torch.cuda.synchronize(): called by p2p_communication after batched send/recv, by
    # parallel_state and dist-checkpointing; CPU ops are synchronous, nothing to wait for.
    _replace(torch.cuda, "synchronize", _noop)
    # torch.cuda.empty_cache(): DDP / optimizer memory housekeeping; no CUDA cache exists.
    _replace(torch.cuda, "empty_cache", _noop)
    # torch.cuda.Stream / Event / current_stream / stream(): DDP's communication stream and
    # param_and_grad_buffer's stream/event waits around gradient reduction, and the 1F1B
    # schedule's comm stream helpers. Stand-ins that accept the same calls and do nothing.
    _replace(torch.cuda, "Stream", _CpuStream)
    _replace(torch.cuda, "Event", _CpuEvent)
    _replace(torch.cuda, "current_stream", lambda *a, **k: _CURRENT_STREAM)
    _replace(torch.cuda, "stream", _stream_context)
    logging.getLogger(mrandom.__name__).addFilter(_rng_filter)
    _enabled = True
    return True


def disable() -> None:
    """Undo enable() (restores every original object). For tests; harmless when not enabled."""
    global _enabled
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)
    if "megatron.core.tensor_parallel.random" in sys.modules:
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_rng_filter)
    _enabled = False


# ---------------------------------------------------------------------------------------------
# Scoped: device="cuda" -> CPU.
# ---------------------------------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int as a device means "cuda:<int>" to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites the CUDA device requests megatron-core hard-codes:

    - ``torch.zeros(..., device="cuda")`` and friends: the pipeline schedules' token counter
      (schedules.py ``total_num_tokens``), clip_grads' norm buffers, the optimizer's found_inf /
      scale tensors, p2p shape tensors. Any ``device=`` keyword naming CUDA becomes the CPU.
    - ``Tensor.cuda()`` / ``Module.cuda()`` (which calls Tensor.cuda per parameter), and
      ``Tensor.to("cuda")``: the tensor stays on the CPU.
    - ``Tensor.type()`` without arguments: megatron asserts ``grad.type() ==
      'torch.cuda.FloatTensor'`` in clip_grads and dispatches on ``param.type()`` in the mixed-
      precision optimizer; report the CUDA name of the same dtype so those checks keep meaning
      "fp32 / bf16 tensor on the training device".
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]) and not isinstance(args[1], torch.dtype):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Within this block CUDA device requests land on the CPU (no-op when CUDA exists or when
    enable() was not called). Re-entrant."""
    if not _enabled:
        yield
        return
    with _CudaToCpuMode():
        yield


# ---------------------------------------------------------------------------------------------
# megatron-core's static inference engine (generation.backend "megatron"). Added for it, and
# switched on only by enable_inference_engine(), which the Megatron generation backend calls:
# training never sees these. Same rule as enable(): only calls that *fail* on a machine
# without CUDA are redirected, and disable() restores them too (they go through _replace).
# ---------------------------------------------------------------------------------------------

from time import perf_counter as _perf_counter  # noqa: E402  (kept inside this block)


class _TimedCpuEvent(_CpuEvent):
    """The event stand-in plus timing. TextGenerationController's static-batch loop records a
    `torch.cuda.Event(enable_timing=True)` per step and afterwards asks consecutive events for
    `elapsed_time()` (milliseconds) to fill each request's per-token latency (`request.tpot`).
    CPU ops are synchronous, so the host clock at record() is the event's time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._time_s: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time_s = _perf_counter()

    def elapsed_time(self, end_event: "_TimedCpuEvent") -> float:
        if self._time_s is None or end_event._time_s is None:
            raise RuntimeError("elapsed_time: both events must have been recorded")  # as CUDA says
        return (end_event._time_s - self._time_s) * 1e3


def _assert_cpu_tensor(tensor: Any) -> None:
    assert tensor is not None  # the rest of what megatron's _is_cuda checks
    assert tensor.device.type == "cpu"


def enable_inference_engine() -> bool:
    """Redirections megatron-core's static inference engine needs on a CPU-only machine, on top
    of enable(). Idempotent; a no-op (returns False) unless enable() is on.

    - torch.cuda.Event -> _TimedCpuEvent (record() / elapsed_time(), see the class).
    - megatron.core.inference.communication_utils._is_cuda: broadcast_from_last_pipeline_stage
      (the pipeline-parallel path, which sends the last stage's logits to every stage) asserts
      `tensor.is_cuda` on the sending side; on the CPU the tensor is a CPU tensor, which is
      the same statement for this machine.
    """
    if not _enabled:
        return False
    import megatron.core.inference.communication_utils as comm

    if torch.cuda.Event is not _TimedCpuEvent:
        _replace(torch.cuda, "Event", _TimedCpuEvent)
    if comm._is_cuda is not _assert_cpu_tensor:
        _replace(comm, "_is_cuda", _assert_cpu_tensor)
    return True


# ---------------------------------------------------------------------------------------------
# Mamba-2 kernels for hybrid models (Nemotron-H). Added for policy/hybrid.py, which calls
# install_mamba_reference_kernels() before it builds a hybrid model; GPT models never see it.
# megatron.core.ssm.mamba_mixer binds mamba-ssm / causal-conv1d functions at import time (None or
# a MagicMock without them) and runs only on CUDA/Triton. On a machine without CUDA the torch
# references in policy/mamba_reference.py take their place *in that module only*: nothing is put
# in sys.modules, so transformers' Nemotron-H keeps its own pure-torch path (the tests compare the
# two). disable() restores the originals (they go through _replace).
# ---------------------------------------------------------------------------------------------


def install_mamba_reference_kernels() -> bool:
    """Point megatron's MambaMixer at the torch reference kernels when CUDA is absent.
    Idempotent; returns whether the references are in place (False on a GPU machine)."""
    if not is_needed():
        return False
    import megatron.core.ssm.mamba_mixer as mixer
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from nemo_igrpo.policy import mamba_reference as ref

    if mixer.mamba_split_conv1d_scan_combined is ref.mamba_split_conv1d_scan_combined:
        return True

    class _ReferenceExtendedRMSNorm(ref.RMSNormGated):
        """megatron's ExtendedRMSNorm (gated RMSNorm + a TP-sharded checkpoint entry) on the torch
        norm: its base class is mamba-ssm's Triton norm, a MagicMock when mamba-ssm is missing."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True),
                prefix,
                {"weight": 0},
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )

    # MambaMixer.__init__ raises ImportError unless HAVE_MAMBA_SSM.
    _replace(mixer, "HAVE_MAMBA_SSM", True)
    # _ssm_training (training and log-probs, use_mamba_mem_eff_path): conv + scan + gate, with
    # seq_idx from PackedSeqParams for packed micro-batches.
    _replace(mixer, "mamba_split_conv1d_scan_combined", ref.mamba_split_conv1d_scan_combined)
    # _ssm_prefill (use_mamba_mem_eff_path=False): the unfused conv and scan.
    _replace(mixer, "mamba_chunk_scan_combined", ref.mamba_chunk_scan_combined)
    _replace(mixer, "causal_conv1d_fn", ref.causal_conv1d_fn)
    # The mixer's `norm` (gated RMSNorm applied after the scan).
    _replace(mixer, "ExtendedRMSNorm", _ReferenceExtendedRMSNorm)
    # _ssm_training asks this for packed sequences; it reads mamba_ssm.__version__ and
    # causal_conv1d.__version__, which do not exist here. The references support packing (seq_idx).
    _replace(mixer, "_check_mamba_sequence_packing_support", lambda for_inference_not_training=True: (True, None))
    return True


# ---------------------------------------------------------------------------------------------
# megatron-bridge's import of TransformerEngine.
# ---------------------------------------------------------------------------------------------


class _Unavailable:
    """A class no object is an instance of: isinstance(x, te.Linear) is False for every module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("TransformerEngine is not installed (nemo_igrpo CPU import stub)")


def _te_stub_modules() -> dict[str, types.ModuleType]:
    te = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_ops = types.ModuleType("transformer_engine.pytorch.ops")
    for name in ("Linear", "LayerNormLinear", "LayerNormMLP", "TransformerLayer", "DotProductAttention"):
        setattr(te_pt, name, type(name, (_Unavailable,), {}))
    te_ops.Sequential = type("Sequential", (_Unavailable,), {})
    te_pt.ops = te_ops
    te.pytorch = te_pt
    for mod in (te, te_pt, te_ops):
        mod.__nemo_igrpo_stub__ = True
    return {"transformer_engine": te, "transformer_engine.pytorch": te_pt, "transformer_engine.pytorch.ops": te_ops}


def transformer_engine_importable() -> bool:
    """True when the real TransformerEngine imports (not our stub)."""
    mod = sys.modules.get("transformer_engine")
    if mod is not None:
        return not getattr(mod, "__nemo_igrpo_stub__", False)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def import_megatron_bridge() -> types.ModuleType:
    """Import megatron.bridge, with a TE import stub in place only if TE is missing.

    megatron-bridge 0.6.2 does ``import transformer_engine.pytorch as te`` at module level in
    peft/lora_layers.py (reached from AutoBridge); it only uses ``te.Linear`` etc. in isinstance
    checks for LoRA, which we do not use. megatron.core is imported *first* so its own
    ``HAVE_TE`` flags stay False (it must not pick TE code paths), and the stub is removed from
    sys.modules right after the import so later ``try: import transformer_engine`` probes fail
    as they should. (Model families whose bridge modules probe TE at import time, e.g. DeepSeek
    or GLM, see it as present; they need TE anyway and are not supported on CPU.)
    """
    if "megatron.bridge" in sys.modules:
        return sys.modules["megatron.bridge"]
    # Everything megatron-bridge pulls from megatron-core / megatron.training and that probes TE
    # at import time must be imported before the stub exists (else it would take TE code paths).
    import megatron.core  # noqa: F401
    import megatron.core.models.hybrid.hybrid_layer_specs  # noqa: F401
    import megatron.training  # noqa: F401

    if transformer_engine_importable():
        import megatron.bridge

        return megatron.bridge
    stubs = _te_stub_modules()
    sys.modules.update(stubs)
    try:
        import megatron.bridge
        from megatron.bridge import AutoBridge  # noqa: F401  (pulls in the lora_layers import)
    finally:
        for name in stubs:
            if sys.modules.get(name) is stubs[name]:
                del sys.modules[name]
    return megatron.bridge
