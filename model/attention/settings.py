"""Every setting of routed attention: the implementation names, the device defaults, and the environment variables,
read here and only here, each checked when it is used (a bad value is a one-line ValueError there, never at import).

- `TRAR_ATTENTION`: an implementation name that overrides every module's `transformer.attention` (empty: no override).
- `TRAR_CPU_KERNEL`: `0` runs shared scores' PyTorch ops instead of building and running the fused CPU kernel.
- `TORCH_EXTENSIONS_DIR`: torch's, where the CPU kernel is built (default ~/.cache/torch_extensions).
- `TRITON_INTERPRET`: Triton's; `1` lets the `triton` implementation run on CPU tensors (Triton's interpreter).

`use_implementation` / `set_implementation` override the choice inside one process (tests, benchmarks); they take
precedence over `TRAR_ATTENTION`.
"""
import contextlib
import os
from pathlib import Path
from typing import Iterator

# Implementations of routed attention, one file each in model/attention/: `shared_scores` one score matrix shared by
# every order, `flex` FlexAttention for the local orders and flash SDPA for the global ones, `triton` fused kernels,
# `dense` one masked SDPA per order.
IMPLEMENTATIONS = ('shared_scores', 'flex', 'triton', 'dense')
# `auto` (the config default) picks by device: what CUDA runs is the fastest implementation in
# benchmarks/gpu_check.py's figures (set it from them); every other device runs `shared_scores`.
CUDA_DEFAULT = 'flex'
CHOICES = ('auto', *IMPLEMENTATIONS)

_forced: str | None = None  # set by set_implementation / use_implementation


def check_implementation(name: str, source: str = 'transformer.attention') -> str:
    """`name` if it is 'auto' or an implementation, else a one-line ValueError naming `source`."""
    if name not in CHOICES:
        raise ValueError(f"{source} {name!r}: expected one of {', '.join(CHOICES)}")
    return name


def environment_implementation() -> str | None:
    """The implementation `TRAR_ATTENTION` forces, None when unset or empty (checked on each use)."""
    name = os.environ.get('TRAR_ATTENTION') or None
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"TRAR_ATTENTION {name!r}: expected one of {', '.join(IMPLEMENTATIONS)} (or unset)")
    return name


def forced_implementation() -> str | None:
    """The implementation forced over the modules' own choice: `use_implementation`'s, else TRAR_ATTENTION's."""
    return _forced if _forced is not None else environment_implementation()


def set_implementation(name: str | None) -> None:
    """Force one implementation of routed attention in this process (benchmarks, tests); None: the modules choose."""
    global _forced
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"routed attention implementation {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    _forced = name


@contextlib.contextmanager
def use_implementation(name: str | None) -> Iterator[None]:
    """`set_implementation(name)` inside the block, the previous setting after it."""
    previous = _forced
    set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def cpu_kernel_enabled() -> bool:
    """Whether shared scores may build and run its fused CPU kernel: `TRAR_CPU_KERNEL` unset, empty or 1; 0 refuses."""
    value = os.environ.get('TRAR_CPU_KERNEL', '')
    if value not in ('', '0', '1'):
        raise ValueError(f"TRAR_CPU_KERNEL {value!r}: expected 0 (PyTorch ops) or 1 (the fused CPU kernel, default)")
    return value != '0'


def extensions_root() -> Path:
    """torch's extensions directory: `TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions."""
    return Path(os.environ.get('TORCH_EXTENSIONS_DIR') or Path.home() / '.cache' / 'torch_extensions')


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (`TRITON_INTERPRET=1`), where the `triton` implementation takes CPU
    tensors."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
