"""The CPU smoke's stand-in for the GPU machine's package set. On PYTHONPATH, with GPU_CHECK_CARRIED naming a
part's carried.txt (bench/carry.py writes it), an import of an installed package that is neither on the GPU
machine (bench/gpu_machine.txt, with what those packages require here) nor carried for that part fails as it
would there, so a part that needs an uncarried package fails here first. Without GPU_CHECK_CARRIED it does
nothing. The versions are still this environment's."""

import os

if os.environ.get("GPU_CHECK_CARRIED"):
    import importlib.metadata
    import re
    import sys
    from pathlib import Path

    def _names(path):
        lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
        return {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines if line}

    def _with_requirements(names):
        """names and what their versions installed here require: a package the GPU machine has brings its own
        requirements there (this environment's huggingface_hub needs httpx2; the machine's older one does not)."""
        from packaging.requirements import Requirement

        todo, seen = list(names), set(names)
        while todo:
            try:
                lines = importlib.metadata.requires(todo.pop()) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            for line in lines:
                req = Requirement(line)
                name = re.sub(r"[-_.]+", "-", req.name).lower()
                if name not in seen and (req.marker is None or req.marker.evaluate({"extra": ""})):
                    seen.add(name)
                    todo.append(name)
        return seen

    _allowed = _with_requirements(_names(Path(__file__).resolve().parents[1] / "gpu_machine.txt")) | _names(
        os.environ["GPU_CHECK_CARRIED"]) | {"qlora-pipeline"}
    _blocked = {module: dists for module, dists in importlib.metadata.packages_distributions().items()
                if not any(re.sub(r"[-_.]+", "-", d).lower() in _allowed for d in dists)}

    _site_dirs = [os.path.join(d, "") for d in __import__("site").getsitepackages()]

    def _installed_copy(name, spec):
        """Whether spec is the installed package `name` (not a copy vendored elsewhere, as setuptools does)."""
        origin = spec.origin or next(iter(spec.submodule_search_locations or []), "")
        return any(origin.startswith(d + name + os.sep) or origin.startswith(d + name + ".") for d in _site_dirs)

    class _Hidden:
        """A meta path finder that finds nothing of the installed packages the GPU machine would not have, so an
        import fails and an availability probe (importlib.util.find_spec) says absent, as there."""

        def __init__(self, finder):
            self._finder = finder

        def find_spec(self, name, path=None, target=None):
            spec = self._finder.find_spec(name, path, target)
            if spec is not None and path is None and name in _blocked and _installed_copy(name, spec):
                # Search on past site-packages, as there: setuptools' vendored more_itertools is still found.
                elsewhere = [p for p in sys.path if os.path.join(os.path.abspath(p or "."), "") not in _site_dirs]
                spec = self._finder.find_spec(name, elsewhere, target)
                return None if spec is None or _installed_copy(name, spec) else spec
            return spec

        def __getattr__(self, attribute):  # invalidate_caches, find_distributions ...
            return getattr(self._finder, attribute)

    sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
