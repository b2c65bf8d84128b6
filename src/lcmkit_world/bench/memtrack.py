"""One step of lcmkit's distillation with every tensor allocation counted: on fake tensors (shapes only, no memory,
seconds even for SDXL at batch 12, 1024²) or on real ones (the check against the process's measured peak).

:class:`LiveBytes` is a ``TorchDispatchMode``: every aten op's output storage that is new (not one of the op's
inputs, not seen before) adds its ``nbytes`` to the live total, and a weak reference on the storage subtracts them
when it is freed. The log of (bytes, storage, phase) events gives, per phase, the peak of

    live(phase) = other + grad / N_grad,

where ``grad`` is the bytes of the storages that end up as ``.grad`` of a trainable parameter and ``other`` the rest
(activations kept for backward, temporaries, recomputation under gradient checkpointing), so gradients can be
sharded by N afterwards without a second run. Only memory allocated *during* the step is counted; what exists
before it (weights, buffers, AdamW state, the inputs) is the resident part, summed per role by
:func:`resident_bytes`.

:func:`run_step` builds the models with :func:`lcmkit.train.distill.build_models` (the same casts, adapters, student
/ teacher / target and gradient checkpointing as ``lcmkit distill``) and takes one step as ``lcmkit distill`` does:

- ``encode``: VAE encoder (posterior mean) of the batch of images and the text encoder(s), ``no_grad`` (skipped
  with cached latents and text);
- ``teacher``, ``target``: the guided teacher's solver step and f_θ⁻ (:func:`lcmkit.losses.lcd_loss`), ``no_grad``;
- ``student``: f_θ with autograd, then ``backward``;
- ``clip`` (gradient clipping), ``adamw`` (``torch.optim.AdamW``, foreach as on CUDA unless ``foreach=False``),
  ``ema`` (θ⁻ ← μθ⁻ + (1 − μ)θ, full mode), then ``zero_grad(set_to_none=True)``.

AdamW's state is created before the step (as after any first step), so it is resident, not a transient.

On fake CPU tensors autocast applies the CPU's casting policy; with ``cuda_autocast`` the policy CUDA applies
where the two differ in a UNet is emulated (:func:`cuda_autocast_norms`: ``group_norm`` and ``layer_norm`` in
float32, CUDA's autocast fp32 list). Attention runs through ``scaled_dot_product_attention``'s fused kernel
(``_scaled_dot_product_flash_attention_for_cpu``: output and log-sum-exp kept, no N² matrix), as flash /
memory-efficient attention on CUDA.

``python -m lcmkit_world.bench.memtrack SPEC`` takes one real step in a fresh process and adds the kernel's
resident set sizes (:func:`real_step`), for the check against the estimate.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from lcmkit_world.bench import configs

PHASES = ("encode", "teacher", "target", "student", "backward", "clip", "adamw", "ema")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # table name → lcmkit's --mixed-precision


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages allocated under this mode and still alive, with an event log by phase."""

    def __init__(self):
        super().__init__()
        self.phase_name = "other"
        self.events: list[tuple[int, int, str]] = []   # (+/− bytes, storage key, phase)
        self._keys = WeakIdKeyDictionary()               # storage → key
        self._refs: dict[int, weakref.ref] = {}
        self._next = itertools.count()
        self.ops: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = previous

    def _freed(self, key: int, nbytes: int):
        self.events.append((-nbytes, key, self.phase_name))
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if "attention" in name:
            self.ops[name] = self.ops.get(name, 0) + 1
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._keys:
                continue
            key, nbytes = next(self._next), storage.nbytes()
            self._keys[storage] = key
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.events.append((nbytes, key, self.phase_name))
        return out

    def key_of(self, tensor: torch.Tensor) -> int | None:
        return self._keys.get(tensor.untyped_storage())

    def peaks(self, grad_keys: set[int], grad_scale: float = 1.0) -> dict[str, float]:
        """Per phase, the peak of other + grad_scale · grad bytes alive (bytes allocated in the step only)."""
        other = grad = 0
        out: dict[str, float] = {}
        for delta, key, phase in self.events:
            if key in grad_keys:
                grad += delta
            else:
                other += delta
            out[phase] = max(out.get(phase, 0.0), other + grad_scale * grad)
        return out

    def activation_peak(self, grad_keys: set[int], phases=("student", "backward")) -> int:
        """Peak of the non-gradient bytes alive during ``phases``: saved activations, temporaries, recomputation."""
        other, peak = 0, 0
        for delta, key, phase in self.events:
            if key not in grad_keys:
                other += delta
                if phase in phases:
                    peak = max(peak, other)
        return peak


@contextlib.contextmanager
def cuda_autocast_norms():
    """Under (CPU) autocast, ``F.group_norm`` and ``F.layer_norm`` run in float32 with float32 outputs, as CUDA's
    autocast does (its fp32 list; the CPU's lets them run in bfloat16). The functions are replaced for the duration,
    not intercepted by a mode, so the recomputation of gradient checkpointing (inside backward) sees them too."""
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def upcast(fn):
        def wrapped(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return fn(*args, **kwargs)
            up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return wrapped

    for name, fn in originals.items():
        setattr(F, name, upcast(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@dataclass(frozen=True)
class StepSpec:
    """One measured configuration: what changes the bytes allocated during a step."""

    arch: str                      # configs.ARCHITECTURES key, or "world" (the shipped teacher's shapes)
    mode: str                      # full | lora
    precision: str = "fp32"        # fp32 | bf16 (PRECISIONS)
    checkpointing: bool = False
    batch: int = 1
    resolution: int | None = None  # pixels; default the architecture's
    solver: str = "ddim"
    lora_rank: int = 64
    encode: bool = True            # encode images and captions in the step (no cached latents / text)
    foreach: bool = True           # AdamW's multi-tensor path (CUDA's default); False: CPU's default
    cuda_autocast: bool = True     # emulate CUDA's autocast policy for the norms (fake runs)


def resident_bytes(models, optimizer) -> dict[str, int]:
    """Bytes of what exists before the step, by role, each storage counted once (in LoRA mode the teacher, student
    and target are one UNet: its frozen weights are the teacher's, its adapters the student's)."""
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            sid = id(t.untyped_storage())
            if sid not in seen:
                seen.add(sid)
                n += t.untyped_storage().nbytes()
        return n

    pipe = models.pipe
    out = {"student": total(models.trainable())}
    if models.mode == "full":
        out["student"] += total(models.student.buffers())
        out["target"] = total(list(models.target.parameters()) + list(models.target.buffers()))
    else:
        shadow = getattr(models.target, "shadow", None)
        out["target"] = total(shadow.values()) if shadow else 0
    out["teacher"] = total(list(models.teacher.parameters()) + list(models.teacher.buffers()))
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    out["text_encoders"] = total([t for e in encoders for t in [*e.parameters(), *e.buffers()]])
    out["vae"] = total([*pipe.vae.parameters(), *pipe.vae.buffers()])
    out["optimizer"] = total([v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    return out


def world_architecture() -> configs.Architecture:
    """The shipped world teacher's shapes (its unet/vae/text_encoder configs) as an :class:`Architecture`, built
    with random weights like the others (memory does not depend on the values)."""
    import json

    from lcmkit_world.bench.subjects import WORLD_TEACHER

    def read(part):
        return {k: v for k, v in json.loads((WORLD_TEACHER / part / "config.json").read_text()).items()
                if not k.startswith("_")}

    unet, vae = read("unet"), read("vae")
    text = {k: v for k, v in read("text_encoder").items()
            if k not in ("architectures", "dtype", "model_type", "transformers_version", "bos_token_id",
                         "eos_token_id", "pad_token_id")}
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return configs.Architecture(name="world", resolution=unet["sample_size"] * scale, unet=unet, vae=vae,
                                text_encoders=(text,), max_tokens=text["max_position_embeddings"])


def architecture(name: str) -> configs.Architecture:
    return world_architecture() if name == "world" else configs.ARCHITECTURES[name]


def _inputs(arch, batch: int, resolution: int, dtype: torch.dtype):
    """Images in [-1, 1] (B, 3, R, R) and token ids for every text encoder (B, L): the step's data."""
    images = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    vocab = min(c["vocab_size"] for c in arch.text_encoders)
    ids = torch.randint(0, vocab, (batch, arch.max_tokens))
    return images.to(dtype), ids


def _encode(models, pipe, images, ids, arch):
    """z0 (VAE posterior mean × scaling factor) and (cond, uncond) as :class:`lcmkit.train.encode.Encoder` makes
    them, from token ids (no tokenizer: a fake run has no strings to spare)."""
    from lcmkit.denoisers import TextConditioning
    from lcmkit.train.encode import encode_pixels

    with torch.no_grad():
        z0 = encode_pixels(pipe, images)
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        outs = [e(ids.to(e.device), output_hidden_states=True) for e in encoders]
        if arch.sdxl:  # penultimate layers concatenated, the second encoder's pooled projection
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            pooled = outs[-1].text_embeds
            r = images.shape[-1]
            time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(ids), dtype=hidden.dtype)
            cond = TextConditioning(hidden, pooled, time_ids)
            uncond = TextConditioning(torch.zeros_like(hidden), torch.zeros_like(pooled), time_ids)
        else:
            hidden = outs[0].last_hidden_state
            cond = TextConditioning(hidden)
            uncond = TextConditioning(hidden[:1].expand_as(hidden))
    return z0, cond, uncond


def run_step(spec: StepSpec, fake: bool = True, before_step=None, grad_shards=(1, 8)) -> dict:
    """Build the models of ``spec`` (fake or real), take one tracked step; bytes by role and phase.

    ``before_step`` (real runs): called after the models and AdamW state exist, just before the step (the
    real-memory check resets the kernel's peak RSS there). ``phase_peak_bytes[N]`` counts gradients / N
    (``grad_shards``), everything else whole.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lcmkit_world.bench.distill import RecipeSettings

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    policy = cuda_autocast_norms() if (fake and spec.cuda_autocast and spec.precision != "fp32") else None
    with mode, (_swappable(mode) if fake else contextlib.nullcontext()), (_FakeDeepcopy() if fake else
                                                                          contextlib.nullcontext()):
        return _run(spec, RecipeSettings(spec.mode, "memory", spec.lora_rank, float(spec.lora_rank),
                                         mixed_precision=PRECISIONS[spec.precision],
                                         gradient_checkpointing=spec.checkpointing), policy, before_step,
                    grad_shards)


@contextlib.contextmanager
def _swappable(mode):
    """``Module.to`` on fake parameters goes through ``torch.utils.swap_tensors``, which refuses a tensor that has
    weak references; FakeTensorMode keeps one to every fake tensor it makes (its memo, which maps a real or meta
    tensor to the same fake tensor again: nothing here converts one twice). The memo is emptied before each swap."""
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


class _FakeDeepcopy(TorchFunctionMode):
    """``copy.deepcopy`` of a fake tensor as a clone in the same fake mode (by default it makes a new mode, and
    tensors of two modes cannot meet in one op): the full-mode target θ⁻ is ``copy.deepcopy(student)``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__deepcopy__:
            tensor, memo = args
            if id(tensor) not in memo:
                out = tensor.detach().clone()
                memo[id(tensor)] = (torch.nn.Parameter(out, tensor.requires_grad)
                                    if isinstance(tensor, torch.nn.Parameter) else out)
            return memo[id(tensor)]
        return func(*args, **(kwargs or {}))


def _run(spec: StepSpec, settings, policy, before_step, grad_shards) -> dict:
    from lcmkit.losses import lcd_loss
    from lcmkit.pipelines import vae_scale_factor
    from lcmkit.train.distill import build_models, draw, make_denoisers
    from lcmkit.train.optim import ema_update_
    from lcmkit.train.rng import generator_for
    from lcmkit.train.runtime import weight_dtype

    arch = architecture(spec.arch)
    resolution = spec.resolution or arch.resolution
    pipe = configs.build_pipeline(arch)
    models = build_models(settings, pipe, torch.device("cpu"), generator_for(0, 1))
    params = models.trainable()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, foreach=spec.foreach)
    for p in params:  # AdamW's state, as after a first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    images, ids = _inputs(arch, spec.batch, resolution, weight_dtype(settings.mixed_precision))
    resident = resident_bytes(models, optimizer)
    skip = 20
    latent = resolution // vae_scale_factor(pipe)
    omega, index, noise = draw(spec.batch, (spec.batch, 4, latent, latent), (5.0, 15.0),
                               len(models.alphas_cumprod) // skip, generator_for(0, 0))
    if not spec.encode:
        z0, cond, uncond = _encode(models, pipe, images, ids, arch)
    if before_step is not None:
        before_step()
    tracker = LiveBytes()
    with tracker, (policy or contextlib.nullcontext()):
        if spec.encode:
            with tracker.phase("encode"):
                z0, cond, uncond = _encode(models, pipe, images, ids, arch)
        student, target, teacher = make_denoisers(models, cond, uncond, omega)
        timed = lambda name, f: lambda x, t: _in_phase(tracker, name, f, x, t)  # noqa: E731
        with tracker.phase("student"):
            loss, _ = lcd_loss(timed("student", student), timed("target", target), timed("teacher", teacher), z0,
                               noise, index, models.alphas_cumprod, skip=skip, solver=spec.solver)
        with tracker.phase("backward"):
            loss.backward()
        grad_keys = {tracker.key_of(p.grad) for p in params if p.grad is not None} - {None}
        grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        with tracker.phase("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with tracker.phase("adamw"):
            optimizer.step()
        with tracker.phase("ema"):
            if models.mode == "full":
                ema_update_(models.target.parameters(), models.student.parameters(), 0.95)
            optimizer.zero_grad(set_to_none=True)
        del loss, student, target, teacher
    peaks = {str(n): tracker.peaks(grad_keys, 1 / n) for n in grad_shards}
    return {"spec": dict(spec.__dict__), "resolution": resolution, "trainable_params": sum(p.numel() for p in params),
            "resident_bytes": resident, "grad_bytes": grads, "activation_bytes": tracker.activation_peak(grad_keys),
            "phase_peak_bytes": {n: {p: int(v.get(p, 0)) for p in PHASES if p in v} for n, v in peaks.items()},
            "fsdp_units": fsdp_units(models), "attention_ops": tracker.ops}


def _in_phase(tracker: LiveBytes, name: str, f, x, t):
    with tracker.phase(name):
        return f(x, t)


def fsdp_units(models) -> dict:
    """Trainable parameters per FSDP unit of the student: each ResnetBlock2D and BasicTransformerBlock is one unit
    (``fully_shard`` per block), the rest is the root. FSDP all-gathers a unit's parameters for its forward and
    backward and frees them after; ``max`` is the largest unit."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    units, inside = [], set()
    for module in models.student.modules():
        if isinstance(module, (ResnetBlock2D, BasicTransformerBlock)) and id(module) not in inside:
            ps = [p for p in module.parameters() if p.requires_grad]
            inside.update(id(m) for m in module.modules())
            inside.update(id(p) for p in ps)
            units.append(sum(p.numel() for p in ps))
    root = sum(p.numel() for p in models.trainable() if id(p) not in inside)
    return {"count": len(units), "max_params": max(units, default=0), "root_params": root}


def real_step(spec: dict) -> dict:
    """One real step of ``spec`` (CPU defaults: no CUDA norm policy, AdamW's single-tensor path), tracked, with
    VmRSS after the imports (``start_mb``) and after the models are built (``models_mb``, after ``malloc_trim``
    hands freed heap back), and VmHWM over the step (``step_peak_mb``, the peak reset just before it)."""
    import ctypes

    import diffusers  # noqa: F401  (imported before the baseline, as everything the step needs)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lcmkit.train.distill  # noqa: F401
    from lcmkit_world.bench.distill import memory_mb, reset_peak

    cpu = torch.device("cpu")
    rss = {"start_mb": memory_mb(cpu)["current_mb"]}

    def before_step():
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        rss["models_mb"] = memory_mb(cpu)["current_mb"]
        rss["peak_reset"] = reset_peak(cpu)

    result = run_step(StepSpec(**dict(spec, cuda_autocast=False, foreach=False)), fake=False,
                      before_step=before_step, grad_shards=(1,))
    rss["step_peak_mb"] = memory_mb(cpu)["peak_mb"]
    return dict(result, rss=rss)


if __name__ == "__main__":  # one real step in a fresh process: JSON on the last line of stdout
    import json
    import sys

    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(real_step(json.loads(sys.argv[1]))))
