"""The spec system: extends, --set, path resolution, schema, and 30 bad specs that each fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pathssl_cli import specs as specs_module
from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.specs import load_spec, spec_to_toml


@pytest.fixture(autouse=True)
def toy_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(specs_module.SPEC_KINDS, "toy", "toy_spec:ToySpec")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD = 'kind = "toy"\n[data]\nroot = "data"\n'


def test_valid_spec_resolves_paths_against_its_file(tree: Path) -> None:
    spec = load_spec(write(tree / "s.toml", GOOD + '[run]\noutput_dir = "out"\n'))
    assert spec.data.root == tree / "data"
    assert spec.run.output_dir == tree / "out"
    assert spec.source_file == tree / "s.toml"


def test_extends_deep_merge_and_parent_relative_paths(tree: Path) -> None:
    write(tree / "base" / "base.toml", 'kind = "toy"\n[data]\nroot = "../data"\n[optim]\nlr = 0.5\nbatch_size = 4\n')
    child = write(tree / "child.toml", 'extends = "base/base.toml"\n[optim]\nbatch_size = 16\n')
    spec = load_spec(child)
    assert spec.optim.lr == 0.5 and spec.optim.batch_size == 16  # merged, child wins
    assert spec.data.root == tree / "data"  # relative to base.toml's folder


def test_set_overrides_parse_toml_and_bare_strings(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    spec = load_spec(write(tree / "sub" / "s.toml", 'kind = "toy"\n[data]\nroot = "../data"\n'),
                     ["optim.lr=0.25", "data.patterns=['a/*.svs', 'b.svs']", "run.output_dir=runs/x",
                      "optim.schedule=step"])
    assert spec.optim.lr == 0.25 and spec.optim.schedule == "step"
    assert spec.run.output_dir == tree / "runs" / "x"  # --set paths are relative to the working directory
    assert spec.data.patterns == [str(tree / "a/*.svs"), str(tree / "b.svs")]


def test_show_round_trips(tree: Path) -> None:
    spec = load_spec(write(tree / "s.toml", GOOD))
    again = load_spec(write(tree / "resolved.toml", spec_to_toml(spec)))
    assert again.model_dump() == spec.model_dump()


def test_schema_is_json_schema() -> None:
    result = CliRunner().invoke(cli, ["spec", "schema", "toy"])
    schema = json.loads(result.output)
    assert result.exit_code == 0 and schema["properties"]["optim"]
    assert schema["$defs"]["ToyOptim"]["properties"]["lr"]["exclusiveMinimum"] == 0


def test_all_problems_reported_at_once(tree: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tree / "s.toml", GOOD + '[optim]\nlr = -1\nbatch_size = 0\nschedul = "step"\n'))
    wheres = {p.where.split(": ")[-1] for p in info.value.problems}
    assert wheres == {"optim.lr", "optim.batch_size", "optim.schedul"}


# (file name, TOML text, overrides, text that must appear in the message)
BAD: list[tuple[str, str | bytes, list[str], str]] = [
    ("syntax_quote", 'kind = "toy\n', [], "line 1, column"),
    ("syntax_dup_key", GOOD + 'root = "x"\n', [], "line 4"),
    ("syntax_bad_table", 'kind = "toy"\n[data\n', [], "line 2"),
    ("unknown_top_key", GOOD + 'epochs = 3\n', [], "unknown key 'epochs'"),
    ("unknown_key_hint", GOOD + '[optim]\nbach_size = 8\n', [], "Did you mean 'batch_size'"),
    ("unknown_section_hint", GOOD + '[optimizer]\nlr = 1\n', [], "Did you mean 'optim'"),
    ("wrong_type_str", GOOD + '[optim]\nlr = "fast"\n', [], "optim.lr"),
    ("wrong_type_list", GOOD + '[optim]\nlr = [1, 2]\n', [], "optim.lr"),
    ("table_for_value", GOOD + 'optim = 3\n', [], "optim"),
    ("negative_lr", GOOD + '[optim]\nlr = -0.1\n', [], "greater than 0"),
    ("zero_batch", GOOD + '[optim]\nbatch_size = 0\n', [], "greater than or equal to 1"),
    ("float_batch", GOOD + '[optim]\nbatch_size = 2.5\n', [], "optim.batch_size"),
    ("bad_literal", GOOD + '[optim]\nschedule = "linear"\n', [], "'cosine' or 'step'"),
    ("missing_section", 'kind = "toy"\n', [], "data: required field is missing"),
    ("missing_field", 'kind = "toy"\n[data]\nextra = []\n', [], "data.root: required field is missing"),
    ("missing_file", 'kind = "toy"\n[data]\nroot = "nope"\n', [], "file not found"),
    ("missing_file_in_list", GOOD.replace('"data"', '"data"\nextra = ["data", "gone.h5"]'), [], "gone.h5"),
    ("unknown_backbone", GOOD + '[model]\nbackbone = "resnet51"\n', [], "unknown backbone 'resnet51'"),
    ("unknown_backbone_far", GOOD + '[model]\nbackbone = "alexnet9000"\n', [], "Valid names"),
    ("unknown_timm_model", GOOD + '[model]\nbackbone = "timm:not_a_model"\n', [], "model.backbone"),
    ("missing_weights", GOOD + '[model]\nweights = "w/missing.pth"\n', [], "model.weights"),
    ("cross_field", GOOD + '[optim]\nbatch_size = 6\n[run]\nworld_size = 4\n', [], "not divisible"),
    ("extends_missing", 'extends = "nowhere.toml"\n' + GOOD, [], "parent spec 'nowhere.toml' not found"),
    ("extends_self_cycle", 'extends = "extends_self_cycle.toml"\n' + GOOD, [], "cycle in extends"),
    ("extends_bad_type", 'extends = 3\n' + GOOD, [], "extends"),
    ("kind_missing", '[data]\nroot = "data"\n', [], "missing the top-level 'kind'"),
    ("kind_unknown", GOOD.replace('"toy"', '"tile_"'), [], "Did you mean 'tile'"),
    ("set_no_equals", GOOD, ["optim.lr"], "expected KEY=VALUE"),
    ("set_wrong_type", GOOD, ["optim.batch_size=many"], "--set: optim.batch_size"),
    ("set_unknown_key", GOOD, ["optim.learning_rate=1"], "unknown key 'learning_rate'"),
    ("not_utf8", b'kind = "toy"\n\xff\xfe = 1\n', [], "UTF-8"),
]


@pytest.mark.parametrize(("name", "text", "overrides", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_spec_exits_2_with_a_located_message(tree: Path, name: str, text: str | bytes,
                                                 overrides: list[str], expected: str) -> None:
    path = write(tree / f"{name}.toml", text)
    args = ["spec", "validate", str(path), *[f"--set={o}" for o in overrides]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert str(path) in result.output or "--set" in result.output
    assert "Traceback" not in result.output


def test_extends_cycle_between_two_files(tree: Path) -> None:
    write(tree / "a.toml", 'extends = "b.toml"\n' + GOOD)
    write(tree / "b.toml", 'extends = "a.toml"\n')
    result = CliRunner().invoke(cli, ["spec", "validate", str(tree / "a.toml")])
    assert result.exit_code == 2 and "a.toml -> b.toml -> a.toml" in result.output


def test_error_in_parent_names_the_parent_file(tree: Path) -> None:
    write(tree / "parent.toml", 'kind = "toy"\n[optim]\nlr = "x"\n')
    child = write(tree / "child.toml", 'extends = "parent.toml"\n[data]\nroot = "data"\n')
    with pytest.raises(SpecError) as info:
        load_spec(child)
    assert info.value.problems[0].where == f"{tree / 'parent.toml'}: optim.lr"


def test_missing_spec_file_and_directory(tree: Path) -> None:
    for target in (tree / "absent.toml", tree / "data"):
        result = CliRunner().invoke(cli, ["spec", "validate", str(target)])
        assert result.exit_code == 2 and str(target) in result.output


def test_command_refuses_a_spec_of_another_kind(tree: Path) -> None:
    with pytest.raises(SpecError, match="needs a spec of kind 'tile'"):
        load_spec(write(tree / "s.toml", GOOD), kind="tile")


def test_validate_many_files_reports_each(tree: Path) -> None:
    good = write(tree / "good.toml", GOOD)
    bad = write(tree / "bad.toml", GOOD + "[optim]\nlr = 0\n")
    result = CliRunner().invoke(cli, ["spec", "validate", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"ok: {good}" in result.output and "1 of 2 specs invalid" in result.output


# ------------------------------------------------------------------------------ every problem in one pass
def _wheres(error: SpecError) -> set[str]:
    return {p.where.rpartition(": ")[2] for p in error.problems}


def test_missing_sections_and_missing_inputs_in_one_pass(tree: Path) -> None:
    # Issue 11 item 13: the missing [run] section used to hide the missing data root and weights file.
    spec = write(tree / "s.toml", 'kind = "knn"\n[data]\ndataset = "folder"\nroot = "nowhere"\n'
                                  '[model]\nweights = "missing.safetensors"\n')
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert _wheres(info.value) == {"run", "data.root", "model.weights"}
    by_where = {p.where.rpartition(": ")[2]: p for p in info.value.problems}
    assert str(tree / "nowhere") in by_where["data.root"].message
    assert by_where["data.root"].where.startswith(str(spec))
    # Without input checks only the structure is reported.
    with pytest.raises(SpecError) as info:
        load_spec(spec, check_inputs=False)
    assert _wheres(info.value) == {"run"}


def test_missing_input_in_a_list_is_found_beside_a_bad_value(tree: Path) -> None:
    spec = write(tree / "s.toml", GOOD + 'extra = ["data", "gone.txt"]\n[optim]\nlr = -1\n')
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert _wheres(info.value) == {"optim.lr", "data.extra"}
    assert sum("gone.txt" in p.message for p in info.value.problems) == 1


def test_a_missing_file_does_not_hide_the_input_checks(tree: Path) -> None:
    # The data root exists but holds no split folders: the layout problem is reported beside the missing
    # weights file, not after it is fixed.
    (tree / "empty").mkdir()
    spec = write(tree / "s.toml", 'kind = "knn"\n[data]\ndataset = "folder"\nroot = "empty"\n'
                                  '[model]\nweights = "missing.safetensors"\n[run]\noutput_dir = "out"\n')
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert _wheres(info.value) == {"model.weights", "data.root"}


# ------------------------------------------------------------------------------------------ partial bases
def test_partial_base_named_explicitly_is_checked_as_a_partial(tree: Path) -> None:
    # Issue 11 item 11: `pathssl spec validate specs/**/*.toml` names the _*.toml bases, which lack required
    # sections by design; they were reported invalid.
    base = write(tree / "_base.toml", 'kind = "toy"\n[optim]\nlr = 0.5\n[model]\nweights = "later.pth"\n')
    child = write(tree / "child.toml", 'extends = "_base.toml"\n[data]\nroot = "data"\n[model]\nweights = "random"\n')
    fragment = write(tree / "_run.toml", '[run]\nworld_size = 2\n')
    result = CliRunner().invoke(cli, ["spec", "validate", str(base), str(child), str(fragment)])
    assert result.exit_code == 0, result.output
    assert f"ok: {base} (partial toy base)" in result.output and f"ok: {child} (toy)" in result.output
    assert f"ok: {fragment} (partial base without a kind)" in result.output


def test_partial_base_still_has_its_keys_and_values_checked(tree: Path) -> None:
    write(tree / "specs" / "_base.toml", 'kind = "toy"\n[optim]\nlr = -1\nschedul = "step"\n')
    write(tree / "specs" / "_typo.toml", 'kind = "tiy"\n')
    for args in (["spec", "validate", str(tree / "specs")],
                 ["spec", "validate", str(tree / "specs" / "_base.toml"), str(tree / "specs" / "_typo.toml")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2
        assert "optim.lr" in result.output and "'schedul'" in result.output and "'tiy'" in result.output
        assert "required field" not in result.output and "2 of 2 specs invalid" in result.output


def test_show_without_input_check_resolves_a_spec_whose_inputs_are_absent(tree: Path) -> None:
    spec = write(tree / "s.toml", 'kind = "toy"\n[data]\nroot = "not_here"\n')
    assert CliRunner().invoke(cli, ["spec", "show", str(spec)]).exit_code == 2
    result = CliRunner().invoke(cli, ["spec", "show", "--no-input-check", str(spec)])
    assert result.exit_code == 0, result.output
    assert f'root = "{tree / "not_here"}"' in result.output


def test_running_a_partial_base_says_what_it_is(tree: Path) -> None:
    base = write(tree / "_base.toml", 'kind = "toy"\n[optim]\nlr = 0.5\n')
    result = CliRunner().invoke(cli, ["spec", "show", str(base)])
    assert result.exit_code == 2 and "data" in result.output and "partial base" in result.output
