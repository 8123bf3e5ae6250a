"""absorbdeploy: absorption-aware layer-wise pruning, exported and verified in each runtime.

`import absorbdeploy` is all a user needs before `AutoModelForCausalLM.from_pretrained(DIR/bitmask)`: it registers the
served-sparse format with transformers (sparse/hf.py: register) as soon as transformers is imported, and not before, so
the CLI's --help and bad-input paths stay free of torch and transformers.
"""

import importlib.abc
import importlib.util
import sys
import warnings

from absorbdeploy.version import __version__  # noqa: F401


def _register_with_transformers() -> None:
    if "absorbdeploy.sparse.hf" in sys.modules:  # imported (it registers itself as its last step) or being imported
        return
    try:
        from absorbdeploy.sparse.hf import register

        register()
    except Exception as e:  # never break the user's `import transformers`
        warnings.warn(f"absorbdeploy could not register its bitmask format with transformers: {e}", stacklevel=2)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after the module `transformers` has executed, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
