"""What a job asks of the machine and of its config, checked before anything is allocated.

Two kinds of limit, both raising ``common.cli.UserError`` (one line, exit 2, nothing written)
from an entry point's ``validate(cfg)``:

- **Numbers in the config** (:func:`check_numbers`): every number anywhere in the config must be
  finite (NaN and +-inf are never a setting), and each experiment names the keys that must be
  positive, at least 0, in a range or a non-empty list (its ``RULES``). The finiteness check is
  one walk over the whole config, so a new key is covered without anyone adding it.
- **Memory** (:func:`check_memory`): an estimate of the job's peak memory, made from the config
  and the input's shape alone (nothing allocated), against what the machine has free (on the
  CPU: what the OS calls available, capped by a cgroup limit and shared by the launcher's
  parallel jobs; on CUDA: the device's free memory). The estimates
  (:func:`rank_sweep_memory`, :func:`scaling_memory`, :func:`multimodal_memory`) are rough but
  meant to err high: each phase of a job counts the tensors it holds at once (the input, the
  float64 copies LAPACK works on, the model with its gradients and Adam's two moments, a batch's
  activations two or three times over for the backward pass, the evaluation's temporaries), the
  peak is the largest phase, plus :data:`JOB_OVERHEAD`. ``tests/test_limits.py`` checks them
  against the peak resident memory of real runs (measured here: 1.0-2.5x the real use).

``KS_MEMORY_CHECK=off`` in the environment skips the memory check (for an estimate too cautious
for a machine with swap, say); the error message says so.

Long single torch calls (the SVD behind the loss floor takes minutes at large sizes) run through
:func:`interruptible`, so Ctrl-C and SIGTERM stop the job within a fraction of a second instead
of after the call.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from common.cli import UserError

T = TypeVar("T")
F32, F64 = 4, 8  # bytes per element

# -- numbers in the config ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A constraint on one config value (or on every element of a list value)."""

    test: Callable[[Any], bool]
    says: str  # "<key> must be ..., got <value>"
    # tested on a list as a whole, not on each element (a field, not identity with NON_EMPTY:
    # a sweep job under submitit gets copies of the entry point's rules, pickled by value)
    whole_list: bool = False


POSITIVE = Rule(lambda v: v > 0, "must be positive")
POSITIVE_INT = Rule(lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
FRACTION = Rule(lambda v: 0 < v < 1, "must be in (0, 1)")
UNIT = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
PROPORTION = Rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
NON_EMPTY = Rule(lambda v: len(v) > 0, "must not be empty", whole_list=True)
# seeds feed numpy (non-negative only) and torch generators, some scaled by 1000 or 100003
SEED = Rule(lambda v: isinstance(v, int) and 0 <= v < 2**40, "must be an integer in [0, 2**40)")


def _numbers(node: Any, key: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every number in a config, list elements as ``key[i]``."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_finite(cfg: DictConfig) -> None:
    """Every number anywhere in ``cfg`` (list elements too) is finite: NaN and +-inf are never
    a setting, and would otherwise pass every ``>`` check that follows or fail deep inside."""
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")


def check_rules(cfg: DictConfig, rules: Mapping[str, Rule | tuple[Rule, ...]]) -> None:
    """Each ``rules`` key (dotted; for a list value the rule applies to each element, and
    ``NON_EMPTY`` to the list) obeys its rules; a null value is "not set" and passes."""
    for key, wanted in rules.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        for rule in wanted if isinstance(wanted, tuple) else (wanted,):
            if rule.whole_list:
                if not len(value):
                    raise UserError(f"{key} is empty: it must list at least one value")
                continue
            items = (
                [(f"{key}[{i}]", v) for i, v in enumerate(value)]
                if isinstance(value, ListConfig)
                else [(key, value)]
            )
            for name, v in items:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not rule.test(v):
                    raise UserError(f"{name} {rule.says}, got {_show(v)}")


def check_numbers(cfg: DictConfig, rules: Mapping[str, Rule | tuple[Rule, ...]]) -> None:
    """:func:`check_finite`, then :func:`check_rules` with ``rules`` and the keys every entry
    point shares (rank probe, logger, runtime)."""
    check_finite(cfg)
    check_rules(cfg, {**SHARED_RULES, **rules})


SHARED_RULES: dict[str, Rule | tuple[Rule, ...]] = {
    "seed": SEED,
    "rank_probe.every": NON_NEGATIVE,
    "rank_probe.probe_size": POSITIVE_INT,
    "rank_probe.prop": PROPORTION,
    "rank_probe.eps": UNIT,
    "logger.init_timeout": POSITIVE,
    "runtime.num_threads": POSITIVE_INT,
}


# -- memory -----------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; two significant digits past the point at most."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1e6 else f"{value:.2e} {unit}"
    return f"{int(n)} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (SLURM, containers), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            names = ("memory.max", "memory.current", "inactive_file ")
            bases = [root / rel, root]
        elif "memory" in controllers.split(","):  # v1
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file ")
            bases = [root / "memory" / rel, root / "memory"]
        else:
            continue
        for base in bases:
            limit, used = _read_int(base / names[0]), _read_int(base / names[1])
            if limit is None or used is None:
                continue
            reclaimable = 0
            try:  # page cache the kernel gives back under pressure
                for stat in (base / "memory.stat").read_text().splitlines():
                    if stat.startswith(names[2]):
                        reclaimable = int(stat.split()[1])
            except (OSError, ValueError):
                pass
            return max(0, limit - used + reclaimable)
    return None


def available_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes for a new job's tensors: on CUDA the device's free memory; on the CPU what
    the OS calls available, capped by a cgroup limit (SLURM, containers)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = int(psutil.virtual_memory().available)
    cgroup = _cgroup_available()
    return min(available, cgroup) if cgroup is not None else available


def _parallel_jobs() -> int:
    from experiments.runtime import parallel_jobs  # Hydra's launcher config: at call time

    return parallel_jobs()


def memory_check_enabled() -> bool:
    return os.environ.get("KS_MEMORY_CHECK", "on").strip().lower() not in ("off", "0", "no")


def check_memory(
    needed_bytes: int, what: str, override_hint: str, device: torch.device | str = "cpu"
) -> None:
    """UserError when ``needed_bytes`` exceed the memory free on ``device`` (on the CPU, shared
    by the launcher's parallel jobs): ``"<what> would need ~X GiB, this machine has Y GiB available:
    <override_hint>"``."""
    if needed_bytes <= 0 or not memory_check_enabled():
        return
    device = torch.device(device)
    available = available_memory(device)
    if device.type == "cuda":
        where = f"{device} has {fmt_bytes(available)} free"
    else:
        jobs = _parallel_jobs()
        where = f"this machine has {fmt_bytes(available)} available"
        if jobs > 1:
            available //= jobs
            where += f" ({fmt_bytes(available)} for each of {jobs} parallel jobs)"
    if needed_bytes > available:
        raise UserError(f"{what} would need ~{fmt_bytes(needed_bytes)}, {where}: {override_hint} "
                        "(KS_MEMORY_CHECK=off skips this check)")  # fmt: skip


# What a running job holds beyond its tensors and beyond an idle interpreter with torch loaded:
# kernels and LAPACK loaded on first use, thread stacks, the allocator's slack (measured: 15 MiB
# for the scaling sweep, ~85 for the rank sweep, ~110 for the multimodal trainer).
JOB_OVERHEAD = 256 * 2**20


@dataclass
class Part:
    """Memory held at once in one phase of a job."""

    nbytes: int
    what: str  # "the 20000x40000 weight"
    hint: str  # "use smaller weight.out_features/weight.in_features"


@dataclass
class Need:
    """A job's estimated peak: the phase that needs most, per device kind."""

    phases: dict[str, list[Part]]  # phase name -> parts held together

    @property
    def peak(self) -> tuple[str, int]:
        name = max(self.phases, key=lambda p: sum(x.nbytes for x in self.phases[p]))
        return name, sum(x.nbytes for x in self.phases[name])

    def check(self, device: torch.device | str = "cpu") -> None:
        """check_memory on the peak phase plus :data:`JOB_OVERHEAD`; the message names the
        phase's largest parts and their overrides (those holding a quarter of the largest)."""
        if not self.phases:
            return
        name, total = self.peak
        total += JOB_OVERHEAD
        parts = sorted(self.phases[name], key=lambda x: -x.nbytes)
        big = [p for p in parts if p.nbytes >= parts[0].nbytes / 4]
        what = _join([p.what for p in big])
        hints = list(dict.fromkeys(p.hint for p in big))
        check_memory(total, what, "; or ".join(hints), device)


def _join(items: list[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# -- the rank sweep -------------------------------------------------------------------------------


def weight_build_parts(
    shape: tuple[int, int], init: str | None, dtype_bytes: int, source_bytes: int, hint: str
) -> list[Part]:
    """Making the float32 weight: drawn (``init``), or read from a file of ``source_bytes``."""
    m, n = shape
    mn = m * n
    label = f"the {m}x{n} weight"
    if init is None:  # loaded: the file's tensor, its float32 copy, the finiteness masks
        return [Part(source_bytes + F32 * mn + 2 * mn, label, hint)]
    # drawn in float32; orthogonal runs a QR on a copy, hadamard grows by concatenation
    draw = F32 * mn * (4 if init in ("orthogonal", "hadamard") else 1)
    cast = 0 if dtype_bytes == F32 else (dtype_bytes + F32) * mn  # .to(dtype), then .float()
    return [Part(draw + cast, label, hint)]


def _svd_parts(m: int, n: int, label: str, hint: str, vectors: bool = False) -> list[Part]:
    """An SVD in float64 (ksmm.floors): the float64 copy, LAPACK's own copy and workspace
    (singular vectors too with ``vectors``)."""
    k = min(m, n)
    nbytes = 2 * F64 * m * n + 4 * F64 * k * k + F64 * (m + n) * 8
    if vectors:
        nbytes += F64 * (m * k + k * n) + 2 * F64 * k * k
    return [Part(nbytes, label, hint)]


def chain_widths(shape: tuple[int, int], rank: int, structure: str, nblocks) -> list[int]:
    """Output width of each factor of the chain (ksmm's patterns, no tensors made)."""
    from ksmm.chain import chain_patterns

    m, n = shape
    try:
        patterns = chain_patterns(m, n, rank, structure, nblocks)
    except (ValueError, ZeroDivisionError):
        return [max(m, n)]
    return [p.out_features for p in patterns]


def chain_parameters(shape: tuple[int, int], rank: int, structure: str, nblocks) -> int:
    from ksmm.chain import chain_patterns

    m, n = shape
    try:
        return sum(p.nnz for p in chain_patterns(m, n, rank, structure, nblocks))
    except (ValueError, ZeroDivisionError):
        return m * n


def _floor_parts(shape: tuple[int, int], model_init: str, hint: str) -> list[Part]:
    """The loss floor's float64 SVD; with ``model.init=svd``, the SVD with singular vectors."""
    m, n = shape
    label = f"the {m}x{n} weight"
    if model_init == "svd":
        return _svd_parts(m, n, f"{label} and its SVD (model.init=svd)", hint, vectors=True)
    return _svd_parts(m, n, f"{label} and its SVD (the loss floor)", hint)


def _fixed_data_parts(
    dc: DictConfig, shape: tuple[int, int], widths: list[int]
) -> tuple[list[Part], Part]:
    """``data.mode=fixed``: (the data set, held through training; the validation pass, which
    takes the place of the dense evaluation)."""
    m, n = shape
    s = dc.num_samples
    data = [Part(F32 * s * (2 * n + m), f"data.num_samples={s} samples of {n} inputs",
                 "use a smaller data.num_samples")]  # fmt: skip
    n_val = s - int(s * (1 - dc.val_fraction))
    eval_part = Part(2 * F32 * n_val * (max(widths) + m), f"{n_val} validation samples",
                     "use a smaller data.num_samples")  # fmt: skip
    return data, eval_part


def _probe_part(pc: DictConfig, n: int, widths: list[int]) -> Part:
    """The rank probe: its factor outputs and their float64 SVD copies (nothing when off)."""
    probe = Part(0, "the rank probe", "use a smaller rank_probe.probe_size")
    if pc.enabled:
        b = pc.probe_size
        probe = Part(F32 * b * (n + sum(widths)) + 2 * F64 * b * max(widths),
                     f"the rank probe on {b} inputs", "use a smaller rank_probe.probe_size")  # fmt: skip
    return probe


def _chain_training_parts(
    cfg: DictConfig, shape: tuple[int, int], size_hint: str
) -> tuple[Part, list[Part], Part]:
    """(the chain with gradients and Adam's moments; the fixed data set, if any; the largest of
    a step, the evaluation and the rank probe)."""
    m, n = shape
    mn = m * n
    dc, tc, mc = cfg.data, cfg.train, cfg.model
    widths = chain_widths(shape, cfg.rank, mc.structure, mc.nblocks)
    params = chain_parameters(shape, cfg.rank, mc.structure, mc.nblocks)
    model = Part(4 * F32 * params, f"the chain's {params:,} parameters", size_hint)
    batch = tc.batch_size
    step = Part(3 * F32 * batch * (sum(widths) + m + n), f"a batch of {batch} through the chain",
                "use a smaller train.batch_size")  # fmt: skip
    exact_hint = f"{size_hint}, or data.mode=fixed (no dense evaluation)"
    dense_eval = F32 * (n * n + 2 * n * max(widths) + 3 * mn)
    eval_part = Part(dense_eval, f"the chain's dense {m}x{n} product (data.mode={dc.mode})",
                     exact_hint)  # fmt: skip
    data: list[Part] = []
    if dc.mode == "fixed":
        data, eval_part = _fixed_data_parts(dc, shape, widths)
    if dc.mode == "exact":  # the dense product with autograd, every step
        step = Part(dense_eval + F32 * n * sum(widths) * 2 + 3 * F32 * mn,
                    f"the chain's dense {m}x{n} product (data.mode=exact)", exact_hint)  # fmt: skip
    probe = _probe_part(cfg.rank_probe, n, widths)
    return model, data, max(step, eval_part, probe, key=lambda p: p.nbytes)


def rank_sweep_memory(
    cfg: DictConfig,
    shape: tuple[int, int],
    device: torch.device,
    *,
    init: str | None = None,
    dtype_bytes: int = F32,
    source_bytes: int = 0,
    size_hint: str = "use smaller weight.out_features/weight.in_features",
    weight_only: bool = False,
) -> dict[str, Need]:
    """The rank sweep's peak memory per device kind ({"cpu": ...} or {"cpu", "cuda"});
    ``weight_only``: the weight's phases alone (no chain: any size, any rank).

    Phases, each holding the float32 weight (4MN bytes):
    - build: drawing or loading the weight (on the host);
    - floor: the loss floor's float64 SVD (2 x 8MN and workspace), and the SVD with singular
      vectors of ``model.init=svd``;
    - train: the chain with gradients and Adam's moments (16 bytes per parameter), a batch's
      activations (x3 for the backward pass), the fixed data set (``data.mode=fixed``), and the
      largest of: a step, the evaluation (``fresh``/``exact``: the chain applied to an N x N
      identity, i.e. N x width per factor, and the dense M x N product with its difference and
      square), the rank probe (its factor outputs and their float64 SVD copies).
    """
    m, n = shape
    weight = Part(F32 * m * n, f"the {m}x{n} weight", size_hint)
    build = weight_build_parts(shape, init, dtype_bytes, source_bytes, size_hint)
    floor = [weight, *_floor_parts(shape, cfg.model.init, size_hint)]

    if weight_only:  # what the weight alone needs: checked before the rank and structure
        if device.type != "cuda":
            return {"cpu": Need({"build": build, "floor": floor})}
        return {"cpu": Need({"build": build}), "cuda": Need({"floor": floor})}

    model, data, busiest = _chain_training_parts(cfg, shape, size_hint)
    train = [weight, model, *data, busiest]
    if device.type != "cuda":
        return {"cpu": Need({"build": build, "floor": floor, "train": train})}
    # CUDA: the weight is made on the host and kept there; the fixed data set is drawn there
    host = [weight, *data] if data else []
    return {
        "cpu": Need({"build": build, **({"data": host} if host else {})}),
        "cuda": Need({"floor": floor, "train": train}),
    }


# -- the scaling sweep ----------------------------------------------------------------------------


def scaling_memory(cfg: DictConfig, lrs: int, batch_sizes: list[int]) -> Need:
    """The scaling sweep's peak (CPU): one task at a time (features, labels and the noise's
    float64 temporaries), the stacked student (``lrs`` copies) with gradients and optimizer
    state, and the larger of a step (x3 for backward; the input broadcast to every copy) and the
    validation pass."""
    t, mc = cfg.task, cfg.model
    n, d = t.n_train + t.n_val, t.n_features
    sizes = "use smaller task.n_features/task.n_train/task.n_val"
    task = Part(F32 * n * d + 6 * F64 * n + F32 * n, f"the task's {n}x{d} features", sizes)
    hidden = [mc.hidden] * mc.depth if mc.kind == "mlp" else []
    dims = [d, *hidden, 1]
    per_copy = sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=True))
    students = f"{lrs} stacked students" if lrs > 1 else "the student"
    model = Part(4 * F32 * lrs * per_copy, f"{students} of {per_copy:,} parameters",
                 "use fewer grid.lrs or a smaller model.hidden")  # fmt: skip
    width = d + sum(hidden) + 1
    b = max(batch_sizes, default=1)
    step = Part(3 * F32 * lrs * b * width, f"a batch of {b} through {students}",
                "use smaller batch sizes")  # fmt: skip
    val = Part(2 * F32 * lrs * t.n_val * width, f"the {t.n_val} validation samples through "
               f"{students}", sizes)  # fmt: skip
    return Need({"train": [task, model, max(step, val, key=lambda p: p.nbytes)]})


# -- the multimodal trainer -----------------------------------------------------------------------


def _encoder_maps(size: int, layers: int, width: int) -> tuple[list[tuple[int, int, int]], int]:
    """(in channels, out channels, out side) of each encoder conv (experiments.multimodal_model.
    ImageEncoder), in closed form past the first layers (the map stays at its last side)."""
    convs, c_in, s = [], None, size
    for i in range(min(layers, 64)):
        c_out = width * 2 ** min(i, 2)
        s = (s + 1) // 2 if s > 4 else s
        convs.append((c_in, c_out, s))
        c_in = c_out
    return convs, max(0, layers - 64)  # the rest: (4w, 4w, s) each


def multimodal_parameters(
    channels: int, size: int, vocab: int, max_len: int, mc: DictConfig
) -> tuple[int, int]:
    """(parameters of experiments.multimodal_model.MultimodalModel, elements of one image's
    conv maps through the encoder and decoder), counted without building it (any sizes)."""
    w, latent, e = mc.conv_width, mc.latent_dim, mc.embedding_dim
    convs, extra = _encoder_maps(size, mc.image_encoder_layers, w)
    params, maps = 0, 0
    for c_in, c_out, s in convs:
        params += 9 * (c_in or channels) * c_out + 3 * c_out  # conv, bias, BatchNorm
        maps += c_out * s * s
    c_last, s_last = convs[-1][1], convs[-1][2]
    params += extra * (9 * c_last * c_last + 3 * c_last)
    maps += extra * c_last * s_last * s_last
    params += c_last * s_last * s_last * latent + latent  # proj
    # decoder: up-convolutions from about 4x4 back to the image size
    ups, s = 0, size
    while s > 4 and ups < mc.image_encoder_layers:
        s, ups = (s + 1) // 2, ups + 1
    params += latent * 4 * w * s * s + 4 * w * s * s
    c_in = 4 * w
    for i in range(ups):
        c_out = w * 2 ** max(0, 1 - i)
        s *= 2
        params += 16 * c_in * c_out + 3 * c_out  # transposed conv, bias, GroupNorm
        maps += c_out * s * s
        c_in = c_out
    params += 9 * c_in * channels + channels
    maps += channels * max(s, size) ** 2
    # caption side: prefix, grid tokens, embeddings (the head is tied), both transformers
    num_prefix = mc.prefix_tokens + s_last * s_last
    layer = 12 * e * e + 13 * e
    params += latent * mc.prefix_tokens * e + mc.prefix_tokens * e + c_last * e + e
    params += vocab * e + (num_prefix + max_len) * e + max_len * e + 2 * e + 1
    params += (mc.transformer_layers + mc.caption_encoder_layers) * layer + e * latent + latent
    return params, maps


def multimodal_memory(
    cfg: DictConfig, num_images: int, vocab: int, max_len: int, channels: int,
    device: torch.device,
) -> dict[str, Need]:  # fmt: skip
    """The multimodal trainer's peak: the data set (x3: the decoded images, the stacked array,
    the split's copies), the model with gradients and AdamW's moments (16 bytes a parameter,
    counted in closed form), a batch's activations (every conv map x3 for conv, norm and
    activation; the transformers' token states, attention maps and logits; x2 for the backward
    pass), and the rank probe's encoder maps with their float64 SVD copies (on the host)."""
    dc, mc, tc = cfg.data, cfg.model, cfg.train
    s = dc.image_size
    image = F32 * channels * s * s
    data = Part(3 * image * num_images, f"{num_images} {channels}x{s}x{s} images",
                "use a smaller data.image_size, data.num_train or data.num_val")  # fmt: skip
    params, maps = multimodal_parameters(channels, s, vocab, max_len, mc)
    weights = Part(4 * F32 * params, f"the model's {params:,} parameters",
                   "use smaller model.* sizes")  # fmt: skip
    convs, extra = _encoder_maps(s, mc.image_encoder_layers, mc.conv_width)
    encoder_maps = sum(c * side * side for _, c, side in convs) + extra * (
        convs[-1][1] * convs[-1][2] ** 2
    )
    e, h = mc.embedding_dim, mc.num_heads
    t_dec = mc.prefix_tokens + convs[-1][2] ** 2 + max_len
    t_enc = max_len
    tokens = (mc.transformer_layers * (12 * t_dec * e + 2 * h * t_dec * t_dec)
              + mc.caption_encoder_layers * (12 * t_enc * e + 2 * h * t_enc * t_enc)
              + 4 * max_len * vocab)  # fmt: skip
    b = tc.batch_size
    step = Part(2 * F32 * b * (3 * maps + tokens), f"a batch of {b}'s activations",
                "use a smaller train.batch_size or data.image_size")  # fmt: skip
    pc = cfg.rank_probe
    probe = Part(0, "the rank probe", "use a smaller rank_probe.probe_size")
    if pc.enabled:
        pb = min(pc.probe_size, num_images)
        probe = Part(F32 * pb * 3 * encoder_maps + 2 * F64 * pb * encoder_maps,
                     f"the rank probe on {pb} images",
                     "use a smaller rank_probe.probe_size or rank_probe.enabled=false")  # fmt: skip
    if device.type != "cuda":
        return {"cpu": Need({"train": [data, weights, max(step, probe, key=lambda p: p.nbytes)]})}
    return {
        "cpu": Need({"data": [data, *([probe] if pc.enabled else [])]}),
        "cuda": Need({"train": [weights, step]}),
    }


# -- long calls -----------------------------------------------------------------------------------


def interruptible(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread while the main thread waits in short steps, so
    Ctrl-C and SIGTERM (whose Python handlers run in the main thread, between bytecodes) raise
    within a fraction of a second even when ``fn`` is one long torch call (an SVD of minutes).
    On an interrupt the worker is abandoned (a daemon thread: it dies with the process).
    Torch's per-thread state (grad mode, autocast) is the worker's own: ``fn`` runs without
    grad, as every caller here wants."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            with torch.no_grad():
                result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the main thread
            result["error"] = exc

    worker = threading.Thread(target=work, name=getattr(fn, "__name__", "work"), daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["value"]
