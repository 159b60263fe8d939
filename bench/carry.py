"""The wheels each part of bench/gpu_check.sh needs on the lent GPU machine, and whether they fit one call.

    .venv/bin/python bench/carry.py --out .whl --part train bitsandbytes prefect pydantic liger-kernel==0.8.5 \\
        --part quantize ... [--assets pipeline .qlora/assets]      # gpu_check.sh --carry runs this; so does make

A call to the GPU machine carries at most 64 MiB, the working tree included, and nothing can be fetched there.
For each part: the requirements named, and everything they require, followed through each wheel's own metadata
(markers evaluated for the machine's CPython 3.12 on x86-64 Linux), stopping at what the machine already has
(bench/gpu_machine.txt; a constraint its known version breaks is reported). Versions are requirements.lock's; a
name the lock lacks is pinned where it is named. Wheels come from the registry for CPython 3.12, manylinux
x86-64; a version published only as an sdist is built into a wheel here by a Python 3.12 (gptqmodel 7.6.0 builds
no extension: its CUDA kernels are JIT-compiled from the shipped sources on first use, and this project names the
Triton kernel). bitsandbytes is slimmed to the machine's CUDA major version: its wheel (41 MiB) holds one library
per CUDA, ROCm and XPU version, and the machine's torch (cu130) loads a CUDA 13 one.

Writes OUT/<part>/: the wheels, carried.txt (their names, for the CPU smoke's import guard) and assets/ (files
copied with --assets, weights left out); prints each part's table and a summary. Exit 1 when a part does not fit
or a requirement cannot be met. Downloads and built wheels are cached under --cache.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20  # bytes per call, the working tree included
MiB = 2**20

# The GPU machine's interpreter, for markers and wheel tags.
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "platform_release": "", "platform_version": ""}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                     "manylinux1_x86_64", "linux_x86_64"]
TAGS = {t: i for i, t in enumerate([*cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=PLATFORMS),
                                    *compatible_tags((3, 12), "cp312", PLATFORMS)])}
PIP_TARGET = ["--python-version", "3.12", "--implementation", "cp",
              *(arg for p in PLATFORMS if p != "linux_x86_64" for arg in ("--platform", p))]

# Required by a carried package's metadata, needed by none of the parts: left behind, said why.
WAIVED = {
    "maturin": "a Rust build tool gptqmodel lists among its runtime requirements (10 MiB); nothing imports it",
}
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")  # --assets never carries model weights


def read_pins(path: Path) -> dict[str, str]:
    """name -> version from a `name==version` file (comments and blank lines skipped; a bare name: no version)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


@dataclass
class Carried:
    name: str
    version: str
    wheel: Path
    how: str  # wheel | built from sdist | slimmed ...
    required_by: str
    extras: set[str] = field(default_factory=set)


class Problems(list):
    def add(self, message: str) -> None:
        if message not in self:
            self.append(message)


def python312() -> str:
    """A Python 3.12 to build sdists with (their wheels may hold compiled code for the machine's interpreter)."""
    candidates = [os.environ.get("CARRY_PYTHON312", ""), *sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True), shutil.which("python3.12") or ""]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True)
        if probe.stdout.strip() == "True":
            return candidate
    sys.exit("carry.py: building an sdist for the GPU machine needs a Python 3.12 (set CARRY_PYTHON312)")


def wheel_metadata(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(name).decode())
    return message.get_all("Requires-Dist") or []


def requirements(lines: list[str], extras: set[str], only_extras: bool = False) -> list[Requirement]:
    """The requirements that apply on the GPU machine, for the base package and the extras asked for
    (only_extras: those the extras add)."""
    chosen = []
    for line in lines:
        req = Requirement(line)
        base = req.marker is None or req.marker.evaluate({**MARKER_ENV, "extra": ""})
        extra = req.marker is not None and any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in extras)
        if (extra and not base) if only_extras else (base or extra):
            chosen.append(req)
    return chosen


def slim_bitsandbytes(wheel: Path, out_dir: Path, cuda_major: str) -> Path:
    """The bitsandbytes wheel with its CPU library and its CUDA `cuda_major` libraries alone; RECORD rewritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = out_dir / wheel.name
    if slim.exists() and slim.stat().st_mtime >= wheel.stat().st_mtime:
        return slim
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda_major}\d)\.so$")
    tmp = slim.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if re.search(r"libbitsandbytes_\w+\.so$", n) and not keep.search(n)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",", 1)[0] not in dropped).encode()
            dst.writestr(info, data)
    tmp.rename(slim)
    return slim


class Resolver:
    def __init__(self, cache: Path, problems: Problems):
        self.gpu = read_pins(REPO / "bench" / "gpu_machine.txt")
        self.lock = read_pins(REPO / "requirements.lock")
        self.cuda_major = self.gpu["torch"].rpartition("+cu")[2][:-1] or "13"
        self.downloads, self.built, self.slim = cache / "downloads", cache / "built", cache / "slim"
        for folder in (self.downloads, self.built, self.slim):
            folder.mkdir(parents=True, exist_ok=True)
        self.problems = problems
        self.notes: list[str] = []
        self.unknown: set[str] = set()  # GPU-machine packages constrained at a version not known here

    def find(self, name: str, version: str) -> Path | None:
        """The best cached wheel for the machine (a built one too), else the cached sdist."""
        wheels = []
        for path in [*self.downloads.glob("*.whl"), *self.built.glob("*.whl")]:
            dist, ver, _, tags = parse_wheel_filename(path.name)
            if dist == name and ver == Version(version):
                rank = min((TAGS[t] for t in tags if t in TAGS), default=None)
                if rank is not None:
                    wheels.append((rank, path))
        if wheels:
            return min(wheels)[1]
        for path in self.downloads.iterdir():
            if path.name.endswith((".tar.gz", ".zip")):
                try:
                    dist, ver = parse_sdist_filename(path.name)
                except ValueError:
                    continue
                if dist == name and ver == Version(version):
                    return path
        return None

    def fetch(self, pins: dict[str, str]) -> None:
        missing = [f"{n}=={v}" for n, v in pins.items() if self.find(n, v) is None]
        if missing:  # --no-deps allows an sdist where a version has no wheel for the machine
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--prefer-binary", *PIP_TARGET,
                   "-d", str(self.downloads), *missing]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                self.problems.add(f"pip download {' '.join(missing)} failed: {done.stderr.strip()[-800:]}")
        sdists = [p for n, v in pins.items() if (p := self.find(n, v)) and not p.name.endswith(".whl")]
        if sdists:
            cmd = [python312(), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(self.built), *map(str, sdists)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                self.problems.add(f"building {' '.join(p.name for p in sdists)} with Python 3.12 failed: "
                                  f"{done.stderr.strip()[-800:]}")

    def check_gpu_package(self, req: Requirement, required_by: str) -> None:
        """A requirement on a package the GPU machine has: noted when its known version breaks it."""
        name = canonicalize_name(req.name)
        version = self.gpu[name].split("+")[0]
        if not req.specifier:
            return
        if not version:
            self.unknown.add(name)
        elif not req.specifier.contains(version, prereleases=True):
            note = (f"{required_by} requires {req.name}{req.specifier}; the GPU machine has {version} (kept: "
                    "a carried copy would replace the one the machine's packages were installed with)")
            if note not in self.notes:
                self.notes.append(note)

    def resolve(self, roots: list[str]) -> dict[str, Carried]:
        carried: dict[str, Carried] = {}
        pins: dict[str, str] = {}
        pending: dict[str, tuple[set[str], str]] = {}  # name -> (extras, required by)

        def want(req: Requirement, required_by: str) -> None:
            name = canonicalize_name(req.name)
            if name in self.gpu:
                self.check_gpu_package(req, required_by)
                if req.extras:  # e.g. httpx[http2]: the extra's requirements travel, httpx stays
                    try:
                        lines = importlib.metadata.requires(req.name) or []
                    except importlib.metadata.PackageNotFoundError:
                        self.problems.add(f"{required_by} requires {req}: the extra's requirements are unknown "
                                          f"here ({req.name} is not installed in this environment)")
                        return
                    for sub in requirements(lines, set(req.extras), only_extras=True):
                        want(sub, f"{req.name}[{','.join(sorted(req.extras))}]")
                return
            if name in WAIVED:
                note = f"{name} (required by {required_by}) is not carried: {WAIVED[name]}"
                if note not in self.notes:
                    self.notes.append(note)
                return
            exact = [str(spec.version) for spec in req.specifier if spec.operator == "=="]
            version = pins.get(name) or self.lock.get(name) or (exact[0] if exact else None)
            if not version:
                self.problems.add(f"{req.name} (required by {required_by}) has no version in requirements.lock; "
                                  "pin it where the part names it")
                return
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                self.problems.add(f"{required_by} requires {req.name}{req.specifier}, but {version} is pinned")
            pins[name] = version
            known = carried.get(name)
            extras = set(req.extras)
            if known is None or not extras <= known.extras:
                old, by = pending.get(name, (set(), required_by))
                pending[name] = (old | extras | (known.extras if known else set()), by)

        for root in roots:  # a root's own pin wins over the lock's
            req = Requirement(root)
            pins.update({canonicalize_name(req.name): str(spec.version) for spec in req.specifier
                         if spec.operator == "=="})
            want(req, "the part")
        while pending:
            batch, pending = pending, {}
            self.fetch({n: pins[n] for n in batch})
            for name, (extras, required_by) in batch.items():
                path = self.find(name, pins[name])
                if path is None or not path.name.endswith(".whl"):
                    self.problems.add(f"no wheel of {name}=={pins[name]} for CPython 3.12 manylinux x86-64")
                    continue
                how = "built from its sdist here" if path.parent == self.built else "wheel"
                if name == "bitsandbytes":
                    whole = path.stat().st_size / MiB
                    path = slim_bitsandbytes(path, self.slim, self.cuda_major)
                    how = f"slimmed to its CUDA {self.cuda_major} and CPU libraries (whole: {whole:.1f} MiB)"
                previous = carried.get(name)
                carried[name] = Carried(name, pins[name], path, how,
                                        previous.required_by if previous else required_by, extras)
                for req in requirements(wheel_metadata(path), extras):
                    want(req, name)
        return carried


def tree_bytes() -> int:
    """What travels besides the carried paths: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / f).lstat().st_size for f in listed if f and (REPO / f).exists())


def copy_assets(source: Path, dest: Path) -> int:
    """Copy source's files into dest, leaving model weights out; returns the bytes copied."""
    if not source.is_dir():
        sys.exit(f"carry.py: --assets {source}: no such folder (make assets prepares it)")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*WEIGHTS))
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())


def write_part(out: Path, carried: dict[str, Carried]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = {c.wheel.name for c in carried.values()}
    for stale in out.glob("*.whl"):  # two versions of one package would stop the install there
        if stale.name not in names:
            stale.unlink()
    for item in carried.values():
        target = out / item.wheel.name
        if not target.exists() or target.stat().st_size != item.wheel.stat().st_size:
            shutil.copyfile(item.wheel, target)
    (out / "carried.txt").write_text("".join(f"{n}=={c.version}\n" for n, c in sorted(carried.items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", action="append", required=True, metavar=("NAME", "REQUIREMENT"),
                        help="a part and its requirements (names; name==version where requirements.lock lacks it)")
    parser.add_argument("--assets", nargs=2, action="append", default=[], metavar=("PART", "DIR"),
                        help="also carry DIR's files (weights left out) for PART, as OUT/PART/assets")
    parser.add_argument("--out", type=Path, default=REPO / ".whl")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "qlora-pipeline" / "gpu-carry")
    args = parser.parse_args(argv)

    problems = Problems()
    resolver = Resolver(args.cache, problems)
    tree = tree_bytes()
    assets = {part: Path(src) for part, src in args.assets}
    summary = []
    for name, *roots in args.part:
        carried = resolver.resolve(roots)
        out = args.out / name
        write_part(out, carried)
        extra = copy_assets(assets[name], out / "assets") if name in assets else 0
        wheels = sum(c.wheel.stat().st_size for c in carried.values())
        total = wheels + extra + tree
        print(f"\n## {name}: {len(carried)} wheels in {out}")
        print(f"{'wheel':<28} {'version':<14} {'MiB':>6}  {'required by':<22} how")
        for c in sorted(carried.values(), key=lambda c: -c.wheel.stat().st_size):
            print(f"{c.name:<28} {c.version:<14} {c.wheel.stat().st_size / MiB:>6.2f}  {c.required_by:<22} {c.how}")
        if extra:
            print(f"{'assets (no weights)':<43} {extra / MiB:>6.2f}  {assets[name]}")
        verdict = "fits" if total <= LIMIT else "DOES NOT FIT"
        print(f"total: wheels {wheels / MiB:.2f} + assets {extra / MiB:.2f} + working tree {tree / MiB:.2f} "
              f"= {total / MiB:.2f} MiB of {LIMIT / MiB:.0f}: {verdict}")
        summary.append((name, len(carried), wheels, extra, total))
        if total > LIMIT:
            problems.add(f"{name}: {total / MiB:.2f} MiB does not fit one call ({LIMIT / MiB:.0f} MiB)")
    print("\n## summary (MiB; one call carries at most 64, the working tree included)")
    print(f"{'part':<10} {'wheels':>6} {'MiB':>7} {'assets':>7} {'tree':>6} {'total':>7}")
    for name, count, wheels, extra, total in summary:
        print(f"{name:<10} {count:>6} {wheels / MiB:>7.2f} {extra / MiB:>7.2f} {tree / MiB:>6.2f} {total / MiB:>7.2f}"
              f"  {'fits' if total <= LIMIT else 'DOES NOT FIT'}")
    together, names = tree, []
    for name, _, wheels, extra, _ in summary:  # each folder travels whole, a wheel two parts share twice
        together += wheels + extra
        names.append(name)
        print(f"{' + '.join(names)} in one call: {together / MiB:.2f} MiB: "
              f"{'fits' if together <= LIMIT else 'does not fit'}")
    for note in resolver.notes:
        print(f"note: {note}")
    if resolver.unknown:
        print(f"note: versions not known here, constrained by carried packages: {', '.join(sorted(resolver.unknown))}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
