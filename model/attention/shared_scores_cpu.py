"""The fused CPU kernel of shared-scores routed attention (shared_scores_cpu.cpp): the softmaxes, the mixed map and
their gradients in one pass per row, in cache, instead of a dozen passes of PyTorch ops over (N, N) tensors.

It is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja: about 30 s, once per source,
flags, Python and torch version; `make` does it when it creates .venv) for the instruction set torch reports. Where
it cannot be built, a one-line warning says why and routed attention runs its PyTorch ops; `TRAR_CPU_KERNEL=0` asks
for those.
"""
import functools
import hashlib
import importlib.util
import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

from . import settings

SOURCE = Path(__file__).with_suffix('.cpp')
NAME = 'trar_shared_scores_cpu'
# Compiler flags per instruction set (torch.backends.cpu.get_cpu_capability()): ATen's vector types use the
# instructions the CPU_CAPABILITY macros name; other CPUs get the portable code.
LINK_FLAGS = ['-fopenmp']
ISA_FLAGS = {'AVX2': ['-mavx2', '-mfma'], 'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mfma']}


def runs_on(q: torch.Tensor) -> bool:
    """Whether routed attention on `q` takes the fused kernel: float32 or float64 CPU tensors, in eager mode (under
    torch.compile the PyTorch ops are traced and fused by the compiler), where the kernel can be built."""
    return (q.device.type == 'cpu' and q.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and kernel() is not None)


def maps(scores, rows, index, valid, widths, scale, mixed):
    """(probs, mixed, window probs) of `shared_scores.Maps` from the (b, h, N, N) unscaled scores: the global
    softmax in place of the scores, the mixed map in `mixed`, the window softmaxes as one (b, h, N, L_local, K')
    tensor, K' the window's K keys padded to whole vectors (zero past each order's window)."""
    return scores, mixed, (kernel().forward(scores, rows, index, valid, list(widths), scale, mixed),)


def score_grads(grad_map, maps, rows, index, widths, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d scores times `scale` (in place of d loss / d map) and d loss / d row weights (b, 1 + L_local, N)."""
    grad_scores, grad_rows = kernel().backward(grad_map, maps.probs, maps.window_probs[0], rows, index, list(widths),
                                               scale)
    return grad_scores, grad_rows  # pybind returns a list


def build_directory(source: bytes | None = None, flags: list[str] | None = None) -> Path:
    """Where the kernel is built: one directory per build, under torch's extensions directory (`TORCH_EXTENSIONS_DIR`,
    else ~/.cache/torch_extensions). Its name holds Python, torch and the instruction set, and a hash of the kernel's
    source, its compile and link flags, those three and the header folders the build reads (torch's and Python's,
    which torch writes into the build's ninja file: another environment is another build), so that checkouts share
    a build only when it is the same build. The source is compiled from a copy in that folder (`staged_source`),
    so the checkout's own path is not part of the build."""
    source = SOURCE.read_bytes() if source is None else source
    flags = [*compile_flags(), *LINK_FLAGS] if flags is None else flags
    tag = f'py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-' \
          f'{torch.backends.cpu.get_cpu_capability()}'
    headers = [os.path.dirname(torch.__file__), sysconfig.get_paths()['include']]
    digest = hashlib.sha256(b'\0'.join([source, ' '.join(flags).encode(), tag.encode(),
                                        '\0'.join(headers).encode()])).hexdigest()[:16]
    return settings.extensions_root() / f'{NAME}-{tag}-{digest}'.replace('+', '_')


def staged_source(directory: Path) -> Path:
    """The kernel's source copied into its build folder (written once, atomically: concurrent builds read it whole;
    an unchanged copy keeps its time stamp, so ninja does not rebuild)."""
    staged = directory / SOURCE.name
    source = SOURCE.read_bytes()
    if not staged.is_file() or staged.read_bytes() != source:
        temporary = directory / f'.trar-tmp.{os.getpid()}.{SOURCE.name}'
        temporary.write_bytes(source)
        os.replace(temporary, staged)
    return staged


def compile_flags() -> list[str]:
    """Optimised, OpenMP (at::parallel_for), and the vector instructions of this CPU as torch reports them."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = [*ISA_FLAGS[capability], f'-DCPU_CAPABILITY={capability}', f'-DCPU_CAPABILITY_{capability}'] \
        if capability in ISA_FLAGS else []
    return ['-O3', '-fopenmp', *isa]


@functools.cache
def kernel():
    """The compiled kernel module, or None where it is not wanted or cannot be built (warned once)."""
    if not settings.cpu_kernel_enabled():
        return None
    logging.getLogger('torch.utils.cpp_extension').addFilter(_not_about_cuda)
    from torch.utils import cpp_extension
    directory = build_directory()
    built = directory / f'{NAME}.so'
    if built.is_file():
        try:
            return load_built(built)
        except ImportError:  # a damaged build (killed while linking): built again below
            pass
    path = os.environ.get('PATH', '')
    try:
        if not built.exists():
            print(f"building routed attention's CPU kernel in {directory} (once, about 30 s)", file=sys.stderr)
        directory.mkdir(parents=True, exist_ok=True)
        os.environ['PATH'] = os.pathsep.join(filter(None, [ninja_directory(), path]))  # torch runs `ninja`
        return cpp_extension.load(NAME, [str(staged_source(directory))], extra_cflags=compile_flags(),
                                  extra_ldflags=LINK_FLAGS, build_directory=str(directory))
    except (Exception, SystemExit) as error:  # no compiler or ninja, a failed build: the PyTorch ops still work
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"routed attention's CPU kernel could not be built ({reason}); using its PyTorch ops, "
                      "which are slower", stacklevel=2)
        return None
    finally:
        os.environ['PATH'] = path


def load_built(path: Path):
    """The kernel module already built at `path`, loaded without running ninja. The build folder is named by all
    that goes into the build, so a present library is this build; ninja would rebuild it (minutes on a loaded
    machine) whenever a killed build left its object file newer than ninja's log, and every process waits on the
    folder's lock meanwhile."""
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ninja_directory() -> str | None:
    """The directory of the `ninja` package's executable (requirements.txt; in a virtual environment's bin, which
    is not on PATH unless activated), else None: then PATH's ninja, if any, builds."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _not_about_cuda(record: logging.LogRecord) -> bool:
    """Drop cpp_extension's note, on import on a machine without CUDA, that it found no CUDA runtime."""
    return 'No CUDA runtime' not in record.getMessage()


if __name__ == '__main__':  # `make venv`: build ahead of the first training step
    print(f"routed attention's CPU kernel: {'built' if kernel() else 'unavailable, the PyTorch ops run'}")
