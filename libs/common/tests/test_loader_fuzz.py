"""Whatever a user feeds the loader, the answer is a graph or a SpecError — never a crash."""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_common.errors import SpecError
from loom_common.graph import Graph, load_graph

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "${{ params.x }}",
            "${{ nodes.a.outputs }}",
            "${{",
            "1h30m",
            "* * * * *",
            "a",
            "b",
            "run",
            "true",
            "UTC",
            "Europe/Berlin",
            "${{ success() }}",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
node = st.fixed_dictionaries(
    {},
    optional={
        "run": st.one_of(st.text(max_size=30), st.just("echo ${{ params.x }}")),
        "python": st.sampled_from(["m:f", "bad", "a.b:c"]),
        "http": st.one_of(json_values, st.fixed_dictionaries({"url": st.text(max_size=10)})),
        "needs": st.one_of(st.lists(st.sampled_from(["a", "b", "c", "zz"]), max_size=3), scalars),
        "if": scalars,
        "for_each": json_values,
        "timeout": scalars,
        "retries": scalars,
        "with": json_values,
        "env": json_values,
        "max_parallel": scalars,
    },
)
spec_shaped = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["g", "my-graph"]), scalars)},
    optional={
        "nodes": st.one_of(
            st.dictionaries(st.sampled_from(["a", "b", "c", "1x"]), node, max_size=3), json_values
        ),
        "params": st.one_of(
            st.dictionaries(
                st.sampled_from(["x", "y"]),
                st.fixed_dictionaries(
                    {}, optional={"type": scalars, "default": json_values, "enum": json_values}
                ),
                max_size=2,
            ),
            json_values,
        ),
        "triggers": st.one_of(
            st.lists(
                st.one_of(
                    st.fixed_dictionaries(
                        {"cron": scalars}, optional={"timezone": scalars, "params": json_values}
                    ),
                    st.fixed_dictionaries({"every": scalars}, optional={"start": scalars}),
                    st.fixed_dictionaries({"webhook": json_values}),
                    json_values,
                ),
                max_size=3,
            ),
            json_values,
        ),
        "timeout": scalars,
        "env": json_values,
        "defaults": json_values,
    },
)


def load(text: str) -> Graph | None:
    try:
        return load_graph(text)
    except SpecError as exc:
        assert exc.issues, "a SpecError always lists at least one issue"
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_shaped)
def test_spec_shaped_dicts_give_a_graph_or_a_spec_error(document: dict[str, Any]) -> None:
    load(json.dumps(document))
    load(yaml.safe_dump(document))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            list("ab: -[]{}&*!|>'\"#\n\t%@`,?") + ["${{", "}}", "name: g\n", "nodes:\n"]
        ),
        max_size=40,
    ).map("".join)
)
def test_arbitrary_text_gives_a_graph_or_a_spec_error(text: str) -> None:
    load(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_unicode_gives_a_graph_or_a_spec_error(text: str) -> None:
    load(text)


def test_billion_laughs_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    assert load("\n".join(lines) + "\nname: g\n") is None
