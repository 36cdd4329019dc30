"""The LoRA library and the book's machinery are two layers: importing the first
must not load the second, nor any plotting or widget library."""

import subprocess
import sys

# bitsandbytes: lora_tutorial.quant builds NF4 itself; only the tests compare with it.
HEAVY = ("matplotlib", "ipywidgets", "PIL", "lora_tutorial.book", "bitsandbytes")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_lora_tutorial_loads_no_plotting_or_widget_library():
    modules = loaded_after("import lora_tutorial")
    assert "lora_tutorial.layers" in modules  # the probe does see the package's own modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY or m.startswith("lora_tutorial.book")]


def test_the_book_machinery_is_a_separate_subpackage():
    modules = loaded_after("from lora_tutorial import book")
    assert {"lora_tutorial.book", "lora_tutorial.book.explorer", "matplotlib"} <= modules
