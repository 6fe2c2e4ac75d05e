"""params.yaml schema: strict keys with suggestions, types, ranges, one-line errors."""

from pathlib import Path

import pytest
import yaml

from tlflax.config import Params, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent


def test_project_params_file_is_valid_and_explicit():
    params = load_params(ROOT / "params.yaml")
    assert params.experiment == "vision"
    assert params.finetune.rules[0].pattern == "^head/"
    # Every section is spelled out in the file: the file, not code defaults, holds the values.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {
        "experiment",
        *(f.alias or n for n, f in Params.model_fields.items() if n != "experiment"),
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"finetune": {"learnig_rate": 0.1}},
            "unknown key 'finetune.learnig_rate' (did you mean 'learning_rate'?)",
        ),
        ({"trian_head": {}}, "unknown key 'trian_head' (did you mean 'train_head'?)"),
        ({"finetune": {"augment": {"flipp": True}}}, "did you mean 'flip'?"),
        ({"finetune": {"rules": [{"pattern": "^a", "frezee": True}]}}, "did you mean 'freeze'?"),
        ({"finetune": {"learning_rate": -1}}, "'finetune.learning_rate'"),
        ({"finetune": {"epochs": "many"}}, "'finetune.epochs'"),
        ({"train_head": {"dropout": 1.5}}, "'train_head.dropout'"),
        ({"extract": {"image_size": 8}}, "'extract.image_size'"),
        ({"finetune": {"rules": [{"pattern": "("}]}}, "not a valid regex"),
        ({"finetune": {"rules": []}}, "'finetune.rules'"),
        ({"validate": {"max_class_ratio": 0.5}}, "'validate.max_class_ratio'"),
        ({"experiment": "Has Spaces"}, "'experiment'"),
    ],
)
def test_bad_values_name_the_key(raw, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(raw, source="params.yaml")
    message = str(error.value)
    assert expected in message
    assert message.startswith("params.yaml: ")
    assert "\n" not in message


def test_file_level_errors(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("finetune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ParamsError, match="not valid UTF-8"):
        load_params(binary)


def test_partial_file_takes_defaults():
    params = parse_params({"finetune": {"epochs": 2}})
    assert params.finetune.epochs == 2
    assert params.train_head.head == "linear"
