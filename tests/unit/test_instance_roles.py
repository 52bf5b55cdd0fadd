"""--instance-roles (declared once in ferry/engine/options.py): a spec names one role per instance, prefill ones
first; a bad spec is refused with what to write; an LLM (one engine) refuses the keyword, saying where it applies."""
from __future__ import annotations

import pytest

from ferry.engine.options import engine_config, parse_instance_roles
from ferry.errors import InvalidRequest


def test_a_spec_names_one_role_per_instance():
    assert parse_instance_roles("prefill:1,decode:1") == ("prefill", "decode")
    assert parse_instance_roles(" decode:2 , prefill:1 ") == ("prefill", "decode", "decode")
    assert parse_instance_roles(None) is None


@pytest.mark.parametrize("spec, message", [
    ("prefill:1", "needs both roles"),
    ("prefill:1,decode:0", "count >= 1"),
    ("prefill:1,decode:1,decode:2", "each role once"),
    ("prefil:1,decode:1", "roles: prefill, decode"),
    ("prefill=1,decode=1", "prefill:N,decode:M"),
])
def test_bad_specs_say_what_to_write(spec, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_instance_roles(spec)


def test_one_engine_refuses_the_split():
    with pytest.raises(InvalidRequest, match="ferry serve MODEL --instance-roles"):
        engine_config("m", instance_roles="prefill:1,decode:1")
    with pytest.raises(InvalidRequest, match="needs both roles"):
        engine_config("m", instance_roles="decode:2")
