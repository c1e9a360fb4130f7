"""The tutorial notebooks, their widgets and the book, checked without a browser.

- the stored-output policy (only ``nbval-check-output`` cells keep outputs, text only) and the
  structure every chapter shares (parameters cell with the AGU_MODE switch, >= 2 checked cells,
  exercises with folded solutions, agu_lib imported rather than pasted);
- ``agu_lib.widgets``: the picker and the gamma explorer driven by setting widget values;
- the book's table of contents and the HTML check of tools/build_book.py.

Executing the notebooks is CI's job (``AGU_MODE=ci pytest --nbval-lax --nbval-current-env notebooks/``
and ``agu book --mode ci``); ``AGU_NOTEBOOK_EXEC=1`` also runs them here with papermill.
"""

from __future__ import annotations

import ast
import copy
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_book
import refresh_notebooks

NOTEBOOKS = refresh_notebooks.notebook_paths()
CHAPTERS = ["01_pretrained_gan_and_feedback", "02_directions", "03_stage1_adaptation", "04_stage2_repulsion",
            "05_evaluation", "06_feature_level", "07_your_own_gan"]
IDS = [p.stem[:2] for p in NOTEBOOKS]


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_all_chapters_present():
    assert [p.stem for p in NOTEBOOKS] == CHAPTERS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_outputs_follow_the_policy(path):
    nb = read(path)
    nbformat.validate(nb)
    assert set(nb.metadata) <= set(refresh_notebooks.KEEP_NB_METADATA)
    checked = [c for c in code_cells(nb) if refresh_notebooks.is_checked(c)]
    assert len(checked) >= 2, "at least two cells tagged nbval-check-output"
    for cell in code_cells(nb):
        assert set(cell.metadata) <= {"tags"}, f"cell metadata beyond tags: {cell.source[:60]!r}"
        if refresh_notebooks.is_checked(cell):
            assert cell.outputs, f"checked cell without stored output (run tools/refresh_notebooks.py): {cell.source[:60]!r}"
            assert cell.execution_count is not None  # nbval refuses outputs of 'unrun' cells
            for out in cell.outputs:
                assert out.output_type in ("stream", "execute_result", "display_data"), out.output_type
                assert out.get("name", "stdout") == "stdout", "no stderr in checked cells (warnings, progress bars)"
                assert set(out.get("data", {})) <= set(refresh_notebooks.TEXT_KEYS), "checked cells store text only"
        else:
            assert cell.outputs == [] and cell.execution_count is None, f"unchecked cell keeps outputs: {cell.source[:60]!r}"
    # the stored form is a fixed point of the tool that writes it
    assert refresh_notebooks.apply_policy(copy.deepcopy(nb)) == nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_chapter_structure(path):
    nb = read(path)
    cells = code_cells(nb)
    params = cells[0]
    assert params.metadata.get("tags") == ["parameters"], "the first code cell is papermill's parameters cell"
    assert 'MODE = os.environ.get("AGU_MODE", "full")' in params.source
    code = "\n".join(c.source for c in cells)
    assert "CI = notebook_mode(MODE)" in code, "a MODE typo must stop the notebook, not run the long mode"
    assert 'DEVICE = os.environ.get("AGU_DEVICE", "cpu")' in params.source, "a DEVICE parameter, the CPU by default"
    assert "device = notebook_device(DEVICE)" in cells[1].source
    assert 'notebook_threads(os.environ.get("AGU_THREADS", "1"))' in cells[1].source, "AGU_THREADS checked"
    assert "import agu_lib" in code or "from agu_lib" in code
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Exercises" in markdown
    folded = ":class: dropdown" in markdown or any({"hide-cell", "hide-input"} & set(c.metadata.get("tags", [])) for c in cells)
    assert folded, "solutions are folded in the book"
    for c in cells:  # all code parses (no syntax slips in stored notebooks)
        ast.parse(c.source)


DEVICE_TAKERS = ("load_gan", "load_classifier", "table", "run")  # what would put a model on the CPU unasked


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebooks_put_every_model_on_the_device_parameter(path):
    """With DEVICE = "cuda" every GAN and classifier a notebook loads (or a table it computes) is on the GPU:
    a model left on the CPU would meet the others' tensors there and stop the chapter. (tests/test_gpu.py
    runs every chapter with AGU_DEVICE=cuda where there is a GPU.)"""
    nb = read(path)
    for c in code_cells(nb)[1:]:
        for node in ast.walk(ast.parse(c.source)):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if name in DEVICE_TAKERS:
                    given = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert given.get("device") == "device", f"{path.name}: {ast.unparse(node)[:80]} without device=device"


def _library_function_names() -> set[str]:
    import importlib

    names = set()
    for mod in ("adapt", "unlearn", "losses", "metrics", "directions", "feedback", "pipeline", "plotting", "widgets"):
        m = importlib.import_module(f"agu_lib.{mod}")
        names |= {n for n, f in vars(m).items() if inspect.isfunction(f) and f.__module__ == m.__name__ and not n.startswith("_")}
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebooks_do_not_paste_library_code(path):
    lib = _library_function_names()
    for c in code_cells(read(path)):
        for node in ast.walk(ast.parse(c.source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in lib, f"{path.name} redefines agu_lib's {node.name}; import it instead"


def test_book_toc_lists_every_chapter_and_page():
    yaml = pytest.importorskip("yaml")
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"], *(c["file"] for c in toc["chapters"])]
    assert [f.split("/")[1] for f in files if f.startswith("notebooks/")] == CHAPTERS
    for f in files:
        if not f.startswith("notebooks/"):
            assert (ROOT / "book" / f"{f}.md").is_file(), f
    bib = (ROOT / "book" / "references.bib").read_text()
    assert "2309.14054" in bib and "Elastic Weight Consolidation" in bib


def test_check_html_finds_broken_images_and_errors(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "ok.png").write_bytes(b"\x89PNG")
    (tmp_path / "notebooks" / "a.html").write_text('<img src="../_images/ok.png"><img src="../_images/missing.png">')
    (tmp_path / "notebooks" / "b.html").write_text('<div class="output traceback highlight-ipythontb">x</div>')
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "here.js").write_text("")
    (tmp_path / "d.html").write_text('<script src="_static/here.js?v=1"></script><script src="_static/gone.js"></script>'
                                     '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>')
    problems = build_book.check_html(tmp_path, ["a", "b", "c"])
    assert any("missing.png" in p for p in problems)
    assert any("b.html: error output" in p for p in problems)
    assert any("chapter b has no figure" in p for p in problems)
    assert any("chapter c was not built" in p for p in problems)
    assert not any("ok.png" in p for p in problems)
    assert any("d.html: missing script _static/gone.js" in p for p in problems)
    assert any("d.html: script from the network https://cdn.jsdelivr.net" in p for p in problems)
    assert not any("here.js" in p for p in problems)


def test_book_drops_frozen_progress_bars_and_keeps_the_rest(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("adapt(...)")
    bar = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": "adapt 1/5:   0%|          | 0/1000 [00:00<?, ?it/s]"})
    picker = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2, "version_minor": 0},
        "text/plain": "SamplePicker: 0 of 32 samples selected as negative"})
    text = nbformat.v4.new_output("stream", name="stdout", text="share 91.2% | 50%| of it\n")
    cell.outputs = [bar, text, picker, bar]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"x": {}}, "version_major": 2}}
    nbformat.write(nb, tmp_path / "a.ipynb")
    assert build_book.drop_progress_bars(tmp_path / "a.ipynb") == 2
    assert read(tmp_path / "a.ipynb").cells[0].outputs == [text, picker]
    assert "widgets" not in read(tmp_path / "a.ipynb").metadata  # (no page uses the saved state)


def test_the_book_shows_widgets_as_their_text_and_loads_no_widget_scripts():
    """A static page cannot run a picker or a slider (no kernel), and their scripts come from CDNs (empty
    offline): the book shows the widgets' one-line text, which says how to use them in a live notebook."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["sphinx"]["config"]
    assert ["html", "application/vnd.jupyter.widget-view+json", None] in config["nb_mime_priority_overrides"]
    assert config["nb_ipywidgets_js"] == {}


def test_compare_sees_changed_checked_outputs():
    nb = read(NOTEBOOKS[0])
    ran = copy.deepcopy(nb)
    assert refresh_notebooks.compare(nb, ran) == []
    cell = next(c for c in ran.cells if refresh_notebooks.is_checked(c))
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="something else\n")]
    assert len(refresh_notebooks.compare(nb, ran)) == 1
    cell.outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[])]
    assert any("raised an error" in p for p in refresh_notebooks.compare(nb, ran))


def test_compare_pairs_cells_past_papermills_injected_parameters():
    """papermill -p inserts a cell after the parameters cell; --check --executed once crashed on it."""
    nb = read(NOTEBOOKS[0])
    ran = copy.deepcopy(nb)
    at = next(i for i, c in enumerate(ran.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell('MODE = "full"\n')
    injected.metadata["tags"] = ["injected-parameters"]
    ran.cells.insert(at + 1, injected)
    assert refresh_notebooks.compare(nb, ran) == []
    ran.cells.pop()  # a different notebook
    assert "not the same notebook" in refresh_notebooks.compare(nb, ran)[0]


# ----------------------------------------------------------------------------------------
# Widgets, driven headless


@pytest.fixture
def images():
    return torch.linspace(-1, 1, 12 * 256).reshape(12, 1, 16, 16)


def test_picker_clicks_become_a_manual_oracle(images):
    pytest.importorskip("ipywidgets")
    from agu_lib.errors import ConfigError, FeedbackError
    from agu_lib.widgets import SamplePicker

    picker = SamplePicker(images, ncols=4, scale=2)
    assert picker.selected == [] and len(picker.buttons) == 12
    picker.buttons[7].value = True  # a click
    picker.buttons[2].value = True
    picker.buttons[7].value = False  # a second click unselects
    picker.buttons[9].value = True
    assert picker.selected == [2, 9]
    assert picker.status.value.startswith("2 of 12")
    oracle = picker.oracle()
    assert oracle(images).nonzero().flatten().tolist() == [2, 9]
    assert torch.equal(picker.negatives, images[[2, 9]])
    with pytest.raises(FeedbackError):
        oracle(images.flip(0))  # a ManualOracle answers only for its batch
    picker.select([0, 11])
    assert [b.value for b in picker.buttons].count(True) == 2 and picker.selected == [0, 11]
    with pytest.raises(ConfigError):
        picker.select([12])
    with pytest.raises(ConfigError):
        picker.suggest()  # no suggest oracle given


def test_picker_suggest_preselects_the_oracle_answer(images):
    pytest.importorskip("ipywidgets")
    from agu_lib.widgets import SamplePicker

    bright = lambda x: x.flatten(1).mean(1) > 0.5
    picker = SamplePicker(images, suggest=bright)
    expected = bright(images).nonzero().flatten().tolist()
    assert picker.suggest() == expected and picker.selected == expected
    assert all(picker.buttons[i].button_style == "danger" for i in expected)


def test_picker_clicks_reach_both_stages(tiny_gan):
    """What a student clicks is what stage 1 adapts to and what stage 2 removes (with the latents)."""
    pytest.importorskip("ipywidgets")
    from agu_lib.adapt import AdaptConfig, adapt
    from agu_lib.errors import ConfigError
    from agu_lib.unlearn import UnlearnConfig, unlearn
    from agu_lib.widgets import SamplePicker

    picker = SamplePicker.from_gan(tiny_gan, 12, seed=4, ncols=4, scale=1)
    with torch.no_grad():
        assert torch.equal(picker.images, tiny_gan.generate(tiny_gan.sample_latents(12, 4)))
    for i in (1, 5, 6):
        picker.buttons[i].value = True  # three clicks
    fb = picker.feedback()
    assert torch.equal(fb.negatives, picker.images[[1, 5, 6]]) and len(fb.positives) == 9
    assert torch.equal(fb.negative_latents, picker.latents[[1, 5, 6]]) and fb.negative_share == 0.25
    assert torch.equal(fb.positive_latents, picker.latents[[i for i in range(12) if i not in (1, 5, 6)]])
    adapted = adapt(tiny_gan, picker.negatives, AdaptConfig(iters=2, n_models=1, n_negatives=3, batch_size=4), progress=False)
    res = unlearn(tiny_gan, fb, adapted.models, UnlearnConfig(iters=2, batch_size=4, negative_pool=8), progress=False)
    assert res.gan is not None
    with pytest.raises(ConfigError, match="from_gan"):
        SamplePicker(picker.images).feedback()  # images alone: no latents to keep
    with pytest.raises(ConfigError, match="one row per image"):
        SamplePicker(picker.images, latents=picker.latents[:3])


def test_widgets_say_what_to_do_where_they_do_not_render(tiny_gan):
    pytest.importorskip("ipywidgets")
    from agu_lib.widgets import GammaExplorer, SamplePicker

    picker = SamplePicker.from_gan(tiny_gan, 4, seed=0, scale=1)
    picker.select([2])
    bundle = picker._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # the grid where widgets render
    assert "1 of 4" in bundle["text/plain"] and "picker.select" in bundle["text/plain"]
    ex = GammaExplorer(tiny_gan, [tiny_gan.clone(), tiny_gan.clone()], tiny_gan.sample_latents(2, 0))  # a list of adapted GANs
    assert "explorer.draw" in ex._repr_mimebundle_()["text/plain"]


def test_notebook_mode_accepts_the_two_modes_only():
    from agu_lib.errors import ConfigError
    from agu_lib.widgets import notebook_mode

    assert notebook_mode("ci") is True and notebook_mode("full") is False
    for typo in ("CI", "Full", "", None):
        with pytest.raises(ConfigError, match="MODE must be one of 'full', 'ci'"):
            notebook_mode(typo)


def test_a_mode_typo_in_the_environment_names_the_variable(monkeypatch):
    from agu_lib.errors import ConfigError
    from agu_lib.widgets import notebook_mode

    monkeypatch.setenv("AGU_MODE", "fast")
    with pytest.raises(ConfigError, match="the environment variable AGU_MODE is 'fast'.*or unset it"):
        notebook_mode("fast")
    with pytest.raises(ConfigError, match="MODE must be one of .* got 'CI'.*or set AGU_MODE"):
        notebook_mode("CI")  # from the parameters cell (or papermill's -p)


def test_notebook_threads_checks_and_sets_agu_threads():
    from agu_lib.errors import ConfigError
    from agu_lib.widgets import notebook_threads

    try:
        assert notebook_threads("2") == 2 and torch.get_num_threads() == 2
        assert notebook_threads(" 1 ") == 1 and torch.get_num_threads() == 1
        for bad in ("0", "-1", "two", "1.5", ""):
            with pytest.raises(ConfigError, match=f"AGU_THREADS must be a positive integer .* got {bad!r}"):
                notebook_threads(bad)
    finally:
        torch.set_num_threads(1)


def test_notebook_device_checks_the_device_parameter():
    from agu_lib.errors import ConfigError
    from agu_lib.widgets import notebook_device

    assert notebook_device("cpu") == torch.device("cpu")
    assert notebook_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="DEVICE: unknown device 'gpu'.*'auto'.*AGU_DEVICE"):
        notebook_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="DEVICE: .*no CUDA GPU is available here.*use DEVICE = 'cpu' or 'auto'"):
            notebook_device("cuda")


def test_pick_parameter_reads_papermills_text():
    """`papermill -p PICK [3, 17]` hands the notebook the text "[3, 17]" (it failed with "PICK must be ..."): the
    indices are read from it; a keyword stays a keyword; anything else says how to pass a list."""
    from agu_lib.errors import ConfigError
    from agu_lib.widgets import pick_parameter

    assert pick_parameter("[3, 17]") == [3, 17] and pick_parameter("3,17") == [3, 17] and pick_parameter([99]) == [99]
    assert pick_parameter("auto") == "auto" and pick_parameter("classifier", ("auto", "classifier")) == "classifier"
    assert pick_parameter([]) == []
    for bad in ("classifier", "3.5", "seven", None, [True]):
        with pytest.raises(ConfigError, match=r"PICK must be 'auto' or a list of sample indices.*-y 'PICK: \[3, 17\]'"):
            pick_parameter(bad)


def test_missing_third_party_checkpoints_are_named_in_the_chapters():
    """Chapters 1 and 7 say which file they looked for and what to set when csinva's GAN is not there."""
    paths = [p for p in NOTEBOOKS if p.stem in ("01_pretrained_gan_and_feedback", "07_your_own_gan")]
    assert len(paths) == 2
    for path in paths:
        code = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "third_party_search_path()" in code and "not found (no {ckpt / 'G--300.ckpt'})" in code, path.stem
        assert "(or the THIRD_PARTY_DIR parameter) to the folder that holds csinva_mnist_mlp_gan/" in code, path.stem


def test_gamma_explorer_redraws_the_same_latents(tiny_gan):
    pytest.importorskip("ipywidgets")
    from agu_lib.directions import extrapolate
    from agu_lib.widgets import GammaExplorer

    adapted = tiny_gan.clone()
    with torch.no_grad():
        for p in adapted.generator.parameters():
            p.add_(0.05)
    z = tiny_gan.sample_latents(6, seed=3)
    ex = GammaExplorer(tiny_gan, adapted, z, oracle=lambda x: x.flatten(1).mean(1) > 0, gammas=(0.0, 2.0, 0.5))
    with torch.no_grad():
        assert torch.allclose(ex.images, tiny_gan.generate(z))  # starts at gamma = 1: the original
        ex.slider.value = 2.0  # a drag
        assert torch.allclose(ex.images, extrapolate(tiny_gan, adapted, 2.0).generate(z))
    assert ex.label.value.startswith("gamma = 2.00") and 0.0 <= ex.share <= 1.0
    assert ex.image.value[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------
# Opt-in: execute every notebook here (CI uses nbval and the book build instead)


@pytest.mark.skipif(os.environ.get("AGU_NOTEBOOK_EXEC") != "1", reason="set AGU_NOTEBOOK_EXEC=1 to execute the notebooks")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_ci_mode_and_matches(path, tmp_path):
    pytest.importorskip("papermill")
    out = tmp_path / path.name
    refresh_notebooks.execute(path, out, "ci")
    assert refresh_notebooks.compare(read(path), read(out)) == []


def test_the_book_runs_its_kernels_over_unix_sockets_without_the_tcp_warning(tmp_path, capfd):
    """agu book / refresh_notebooks execute through papermill over IPC (POSIX): no "running over TCP
    without encryption" warning for every chapter, and no socket file left behind."""
    pm = pytest.importorskip("papermill")
    if os.name == "nt":
        assert refresh_notebooks._kernel_manager() == {}
        return
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, dst = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    sockets = lambda: {p.name for p in Path(refresh_notebooks.tempfile.gettempdir()).glob("agu-kernel-*")}
    before = sockets()
    pm.execute_notebook(str(src), str(dst), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                        log_output=False, **refresh_notebooks._kernel_manager())
    assert nbformat.read(dst, 4).cells[0].outputs[0]["text"] == "42\n"
    assert "without encryption" not in capfd.readouterr().err
    assert sockets() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.ipynb", "out.ipynb"]
