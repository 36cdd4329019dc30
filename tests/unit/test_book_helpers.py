"""The notebook helpers: glue writes what myst-nb reads; source_code drops docstrings."""

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import lora_tutorial as lt
from lora_tutorial import book


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


@pytest.mark.parametrize("value", [2192, 1.144, "2192/39312 (5.58%)"])
def test_glue_writes_what_myst_nb_glue_writes(shell, value):
    from myst_nb import glue as myst_glue

    with capture_output() as ours:
        book.glue("key", value)
    with capture_output() as theirs:
        myst_glue("key", value, display=False)
    assert [(o.data, o.metadata) for o in ours.outputs] == [(o.data, o.metadata) for o in theirs.outputs]
    assert ours.outputs[0].metadata["scrapbook"] == {"name": "key", "mime_prefix": "application/papermill.record/"}


def test_source_code_drops_docstrings_and_keeps_code():
    source = book.source_code(lt.LoRALinear.merge_weights_)
    assert source.startswith("@torch.no_grad()\ndef merge_weights_(self) -> None:\n")
    assert '"""' not in source and "self.base.weight += delta" in source
    assert '"""' not in book.source_code(lt.LoRALayer)


def test_the_book_drops_only_bitsandbytes_hub_kernel_message(caplog):
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]
