"""Set up the llama.cpp peer, idempotently, from a fresh machine. Prints one JSON line per step.

    .venv/bin/python benchmarks/llama_peer/provision.py [--cache DIR] [--no-install]
    make llama-peer

Steps, each skipped when its result is already in the cache ($MOE_EMBED_BENCH_CACHE/llama-cpp,
default ~/.cache/moe-embed/bench/llama-cpp):

1. `sdist`: pip-download the llama-cpp-python sdist (pinned in llama_peer/__init__.py).
2. `wheel`: build it once into `wheels/<isa>-<recipe>/` with llama.cpp's own CPU backend
   compiled for this machine (GGML_NATIVE=ON, i.e. -march=native; it is llama.cpp's default
   unless cross-compiling or SOURCE_DATE_EPOCH is set, which is unset here), but without Intel
   AMX (see NO_AMX_FLAGS), no BLAS, no multimodal (LLAVA_BUILD=OFF). `<isa>` names the CPU's
   x86 SIMD feature set: a native wheel from an AVX-512 machine must not run on an AVX2 one.
   About 10-15 minutes on 2 cores; the log goes to `logs/`.
3. `install`: pip-install that wheel into the running interpreter's environment (the project
   venv). Optional for the project: nothing in export/, service/ or workers/ imports it.
4. `converter`: extract convert_hf_to_gguf.py, conversion/ and gguf-py/ from the same sdist.
5. `tool-venv`: a separate venv for the converter's heavy dependencies (CONVERTER_REQUIREMENTS).
6. `check`: import llama_cpp and report its version and llama.cpp's system info.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `llama_peer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_peer import CONVERTER_REQUIREMENTS, LLAMA_CPP_PYTHON_VERSION  # noqa: E402

PACKAGE = "llama-cpp-python"
# Forwarded to llama.cpp's CMake by scikit-build-core. GGML_NATIVE is already llama.cpp's default
# (ON unless cross-compiling or SOURCE_DATE_EPOCH is set); say it explicitly.
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CCACHE=OFF"
# ...minus Intel AMX: on this CPU (AMX_INT8) llama.cpp 0.3.36 puts quantized weights in its AMX
# buffer and dies of a general protection fault in ggml_backend_amx_mul_mat on the first Q8_0 /
# Q4_K matmul (upstream ggml-org/llama.cpp#20824, unfixed). Explicit -mno-* beat -march=native in
# GCC and clang whatever their order; the AVX-512/VNNI kernels and CPU_REPACK stay.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
RECIPE = hashlib.sha256(f"{CMAKE_ARGS}|{NO_AMX_FLAGS}".encode()).hexdigest()[:6]
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
ISA_PREFIXES = ("avx", "amx")
ISA_FLAGS = ("fma", "f16c", "bmi2", "sse4_2", "ssse3")


def default_root() -> Path:
    env = os.environ.get("MOE_EMBED_BENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "moe-embed" / "bench"
    return base / "llama-cpp"


def cpu_isa() -> list[str]:
    """The x86 SIMD flags of this CPU that a -march=native build may use."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return sorted(f for f in flags if f.startswith(ISA_PREFIXES) or f in ISA_FLAGS)


def isa_key() -> str:
    isa = cpu_isa()
    family = "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else "base"
    digest = hashlib.sha256(" ".join(isa).encode()).hexdigest()[:8]
    return f"{family}-{digest}"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def sdist_dir(self) -> Path:
        return self.root / "sdist"

    @property
    def wheel_dir(self) -> Path:
        return self.root / "wheels" / f"{isa_key()}-{RECIPE}"

    @property
    def converter_dir(self) -> Path:
        return self.root / f"converter-{LLAMA_CPP_PYTHON_VERSION}"

    @property
    def converter_script(self) -> Path:
        return self.converter_dir / "convert_hf_to_gguf.py"

    @property
    def tool_venv(self) -> Path:
        return self.root / "tool-venv"

    @property
    def tool_python(self) -> Path:
        return self.tool_venv / "bin" / "python"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def sdist(self) -> Path | None:
        found = sorted(self.sdist_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
        return found[0] if found else None

    def wheel(self) -> Path | None:
        found = sorted(self.wheel_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
        return found[0] if found else None


def paths(root: Path | None = None) -> Paths:
    return Paths(Path(root) if root else default_root())


def emit(step: str, status: str, **fields) -> None:
    print(json.dumps({"step": step, "status": status, **fields}), flush=True)


def _run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> None:
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{cmd[:4]}... failed (exit {rc}); see {log}:\n" + "\n".join(tail))


def step_sdist(p: Paths) -> Path:
    if (found := p.sdist()) is not None:
        emit("sdist", "cached", path=str(found))
        return found
    t = time.perf_counter()
    p.sdist_dir.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"{PACKAGE}=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(p.sdist_dir)],
         log=p.logs / "sdist.log")
    found = p.sdist()
    if found is None:
        raise RuntimeError(f"pip download left no sdist in {p.sdist_dir}")
    emit("sdist", "done", path=str(found), seconds=round(time.perf_counter() - t, 1))
    return found


def step_wheel(p: Paths, sdist: Path) -> Path:
    if (found := p.wheel()) is not None:
        info = p.wheel_dir / "BUILD.json"
        extra = json.loads(info.read_text()) if info.is_file() else {}
        emit("wheel", "cached", path=str(found), build_seconds=extra.get("seconds"))
        return found
    emit("wheel", "building", isa=isa_key(), cmake_args=CMAKE_ARGS, cflags=NO_AMX_FLAGS,
         note="llama.cpp from source: 4 minutes on 2 idle cores, 10 on busy ones")
    t = time.perf_counter()
    tmp = p.wheel_dir.with_name(p.wheel_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)  # llama.cpp turns GGML_NATIVE's default off when set
    env["CMAKE_ARGS"] = CMAKE_ARGS
    for var in ("CFLAGS", "CXXFLAGS"):  # CMake's initial CMAKE_C_FLAGS / CMAKE_CXX_FLAGS
        env[var] = f"{env.get(var, '')} {NO_AMX_FLAGS}".strip()
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(len(os.sched_getaffinity(0)))
    log = p.logs / f"wheel-{isa_key()}.log"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-v",
          str(sdist), "-w", str(tmp)], log=log, env=env)
    wheels = list(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {tmp}, found {wheels}")
    seconds = round(time.perf_counter() - t, 1)
    (tmp / "BUILD.json").write_text(json.dumps({
        "version": LLAMA_CPP_PYTHON_VERSION, "cmake_args": CMAKE_ARGS,
        "cflags": env["CFLAGS"], "isa": cpu_isa(),
        "seconds": seconds, "cores": len(os.sched_getaffinity(0)),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    shutil.rmtree(p.wheel_dir, ignore_errors=True)
    tmp.rename(p.wheel_dir)
    found = p.wheel()
    assert found is not None
    emit("wheel", "done", path=str(found), seconds=seconds, log=str(log))
    return found


def _installed_version(python: str) -> str | None:
    code = ("import importlib.metadata as m\ntry: print(m.version('llama_cpp_python'))\n"
            "except m.PackageNotFoundError: print('')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


def _installed_from(python: str) -> str | None:
    """The wheel a previous install step recorded, beside the installed package."""
    code = ("import importlib.util, pathlib\ns = importlib.util.find_spec('llama_cpp')\n"
            "f = pathlib.Path(s.origin).parent / 'MOE_EMBED_WHEEL' if s else None\n"
            "print(f.read_text().strip() if f and f.is_file() else '')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


def check_installed(root: Path | None = None) -> None:
    """Raise unless this interpreter has the llama-cpp-python that provisioning built for this
    CPU (a -march=native build from another machine can die of SIGILL). Imports nothing."""
    import importlib.util

    p = paths(root)
    spec = importlib.util.find_spec("llama_cpp")
    wheel = p.wheel()
    marker = Path(spec.origin).parent / "MOE_EMBED_WHEEL" if spec and spec.origin else None
    got = marker.read_text().strip() if marker and marker.is_file() else None
    if wheel is None or got != str(wheel):
        raise RuntimeError(
            "the llama.cpp peer is not set up for this machine "
            f"(installed: {got or 'none'}; wanted: a wheel for CPU {isa_key()} in "
            f"{p.wheel_dir}): run `make llama-peer`")


def step_install(p: Paths, wheel: Path, python: str) -> None:
    if (_installed_version(python) == LLAMA_CPP_PYTHON_VERSION
            and _installed_from(python) == str(wheel)):
        emit("install", "cached", python=python)
        return
    t = time.perf_counter()
    _run([python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)],
         log=p.logs / "install.log")
    # its runtime dependencies, without touching what the project already pinned
    _run([python, "-m", "pip", "install", str(wheel)], log=p.logs / "install-deps.log")
    code = ("import importlib.util, pathlib, sys\ns = importlib.util.find_spec('llama_cpp')\n"
            "(pathlib.Path(s.origin).parent / 'MOE_EMBED_WHEEL').write_text(sys.argv[1])")
    subprocess.run([python, "-c", code, str(wheel)], check=True)
    emit("install", "done", python=python, seconds=round(time.perf_counter() - t, 1))


def step_converter(p: Paths, sdist: Path) -> Path:
    marker = p.converter_dir / ".complete"
    if marker.is_file():
        emit("converter", "cached", path=str(p.converter_dir))
        return p.converter_dir
    t = time.perf_counter()
    tmp = p.converter_dir.with_name(p.converter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.split("/", 1)[0] in CONVERTER_PARTS and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    missing = [x for x in CONVERTER_PARTS if not (tmp / x).exists()]
    if missing:
        raise RuntimeError(f"{sdist} lacks {missing} under {prefix}")
    (tmp / ".complete").write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
    shutil.rmtree(p.converter_dir, ignore_errors=True)
    tmp.rename(p.converter_dir)
    emit("converter", "done", path=str(p.converter_dir),
         seconds=round(time.perf_counter() - t, 1))
    return p.converter_dir


def step_tool_venv(p: Paths) -> Path:
    want = "\n".join(CONVERTER_REQUIREMENTS) + "\n"
    marker = p.tool_venv / "moe-embed-requirements.txt"
    if p.tool_python.is_file() and marker.is_file() and marker.read_text() == want:
        emit("tool-venv", "cached", python=str(p.tool_python))
        return p.tool_python
    t = time.perf_counter()
    shutil.rmtree(p.tool_venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(p.tool_venv)], log=p.logs / "tool-venv.log")
    _run([str(p.tool_python), "-m", "pip", "install", "--disable-pip-version-check",
          *CONVERTER_REQUIREMENTS], log=p.logs / "tool-venv-pip.log")
    marker.write_text(want)
    emit("tool-venv", "done", python=str(p.tool_python),
         seconds=round(time.perf_counter() - t, 1))
    return p.tool_python


def step_check(python: str) -> dict:
    code = ("import json, llama_cpp\n"
            "print(json.dumps({'version': llama_cpp.__version__, 'system_info': "
            "llama_cpp.llama_print_system_info().decode().strip()}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    emit("check", "ok", **info)
    return info


def ensure(root: Path | None = None, install: bool = True) -> Paths:
    """Every step; each one is skipped when its result is cached. Returns the cache's paths."""
    p = paths(root)
    p.root.mkdir(parents=True, exist_ok=True)
    sdist = step_sdist(p)
    wheel = step_wheel(p, sdist)
    if install:
        step_install(p, wheel, sys.executable)
    step_converter(p, sdist)
    step_tool_venv(p)
    if install:
        step_check(sys.executable)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help="llama.cpp cache (default $MOE_EMBED_BENCH_CACHE/llama-cpp or "
                    "~/.cache/moe-embed/bench/llama-cpp)")
    ap.add_argument("--no-install", action="store_true",
                    help="build and cache only; do not install into this interpreter's venv")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        p = ensure(args.cache, install=not args.no_install)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        emit("error", "failed", message=str(exc))
        return 1
    emit("done", "ok", cache=str(p.root), seconds=round(time.perf_counter() - t, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
