"""The dated price catalog: shipped LiteLLM rows, user overlays, error messages."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.economics.catalog import SHIPPED, CatalogError, load_catalog


def test_gpt_4o_mini_prices_are_litellm_per_token_times_a_million():
    p = load_catalog().tokens("gpt-4o-mini")
    # litellm 1.110.2 row: input 1.5e-07, output 6e-07, cache read 7.5e-08, batches 7.5e-08 / 3e-07 USD per token.
    # x 1e6: 0.15, 0.60, 0.075, 0.075, 0.30 USD per million tokens.
    assert p.input_usd_per_mtok == 0.15
    assert p.output_usd_per_mtok == 0.60
    assert p.cached_input_usd_per_mtok == 0.075
    assert p.batch_input_usd_per_mtok == 0.075
    assert p.batch_output_usd_per_mtok == 0.30
    assert p.cache_write_usd_per_mtok is None  # OpenAI charges nothing to write its cache
    assert p.training_usd_per_mtok is None
    assert p.cache_min_prefix_tokens == 1024
    assert "litellm 1.110.2" in p.source and p.date == "2026-11-20"


def test_fine_tuned_and_anthropic_rows():
    cat = load_catalog()
    ft = cat.tokens("ft:gpt-4o-mini-2024-07-18")
    # 3e-07 -> 0.30, 1.2e-06 -> 1.20; training 3e-06 -> 3.00 (ours: OpenAI's price list, not LiteLLM's).
    assert (ft.input_usd_per_mtok, ft.output_usd_per_mtok, ft.training_usd_per_mtok) == (0.30, 1.20, 3.00)
    haiku = cat.tokens("claude-haiku-4-5")
    # 1e-06 -> 1.00, 5e-06 -> 5.00, cache read 1e-07 -> 0.10, cache write 1.25e-06 -> 1.25; LiteLLM's min prefix 4096.
    assert (haiku.input_usd_per_mtok, haiku.output_usd_per_mtok) == (1.00, 5.00)
    assert (haiku.cached_input_usd_per_mtok, haiku.cache_write_usd_per_mtok) == (0.10, 1.25)
    assert haiku.cache_min_prefix_tokens == 4096
    # LiteLLM's alias claude-haiku-latest -> claude-haiku-5-5.
    assert cat.tokens("claude-haiku-latest") == cat.tokens("claude-haiku-5-5")


def test_user_file_overrides_a_shipped_row_and_adds_one(tmp_path):
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({
        "gpt-4o-mini": {"input_cost_per_token": 1e-07, "output_cost_per_token": 4e-07, "litellm_provider": "openai"},
        "my-model": {"input_cost_per_token": 2e-06, "output_cost_per_token": 3e-06, "source": "our contract",
                     "date": "2026-01-01", "prompt_cache_min_tokens": 2048},
        "t4": {"usd_per_hour": 0.35},
    }))
    os.utime(user, (1_780_000_000, 1_780_000_000))  # 2026-05-28 UTC
    cat = load_catalog(user)
    p = cat.tokens("gpt-4o-mini")
    assert (p.input_usd_per_mtok, p.output_usd_per_mtok) == (0.10, 0.40)
    assert p.cached_input_usd_per_mtok is None  # the user row replaces the shipped row whole
    assert p.source == str(user) and p.date in ("2026-05-28", "2026-05-27", "2026-05-29")  # local-time date
    mine = cat.tokens("my-model")
    assert (mine.input_usd_per_mtok, mine.source, mine.date, mine.cache_min_prefix_tokens) == (
        2.0, "our contract", "2026-01-01", 2048)
    assert cat.hardware("t4").usd_per_hour == 0.35
    assert "my-model" in cat.names() and "gpt-4o" in cat.names()
    assert load_catalog().tokens("gpt-4o-mini").input_usd_per_mtok == 0.15  # the shipped catalog is untouched


def test_unknown_name_is_one_line_with_close_matches(tmp_path):
    user = tmp_path / "prices.json"
    user.write_text("{}")
    with pytest.raises(CatalogError) as e:
        load_catalog(user).tokens("gpt-4o-mni")
    msg = str(e.value)
    assert "\n" not in msg and "'gpt-4o-mni'" in msg
    assert str(SHIPPED) in msg and str(user) in msg
    assert "gpt-4o-mini" in msg.split("close matches:")[1]
    with pytest.raises(CatalogError, match="unknown hardware preset 'a10'.*close matches: a10g"):
        load_catalog().hardware("a10")


@pytest.mark.parametrize(
    ("text", "needle"),
    [("{not json", "not JSON"), ("[1, 2]", "expected a JSON object"),
     ('{"m": {"input_cost_per_token": "cheap"}}', "'m' field 'input_cost_per_token'"),
     ('{"m": 3}', "'m' is not a JSON object")],
)
def test_malformed_user_file_names_the_file_and_key(tmp_path, text, needle):
    user = tmp_path / "bad.json"
    user.write_text(text)
    with pytest.raises(CatalogError) as e:
        load_catalog(user)
    assert str(user) in str(e.value) and needle in str(e.value)


def test_every_shipped_row_is_sourced_dated_and_priced():
    raw = json.loads(SHIPPED.read_text())
    cat = load_catalog()
    for name, row in raw["models"].items():
        assert row["source"] and row["date"], name
        p = cat.tokens(name)
        assert p.input_usd_per_mtok > 0 and p.output_usd_per_mtok > 0, name
    for name, row in raw["hardware"].items():
        assert row["source"] and row["date"], name
        assert cat.hardware(name).usd_per_hour > 0, name
    assert {"cpu-2core", "t4", "l4", "a10g", "a100", "h100"} <= set(cat.hardware_names())


def test_every_shipped_batch_price_follows_its_providers_rule():
    """A catalog row's batch prices are the provider's batch factor times its prices (OpenAI: half); a row that
    is not would price the batch lever wrong (ft:gpt-4o-2024-08-06 once had 2.225e-06 / 1.25e-05)."""
    from pipeline.economics.prices import PerTokenPrice
    from pipeline.economics.serving import batch_price_mismatches, provider_rule

    catalog = load_catalog()
    wrong = {}
    for name in catalog.names():
        row = catalog.tokens(name)
        price = PerTokenPrice(input_usd_per_mtok=row.input_usd_per_mtok, output_usd_per_mtok=row.output_usd_per_mtok,
                              batch_input_usd_per_mtok=row.batch_input_usd_per_mtok,
                              batch_output_usd_per_mtok=row.batch_output_usd_per_mtok, provider=row.provider)
        if batch_price_mismatches(price, provider_rule(row.provider)):
            wrong[name] = (row.batch_input_usd_per_mtok, row.batch_output_usd_per_mtok)
    assert not wrong
