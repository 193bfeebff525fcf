"""Validation of whole graph documents: every error names its path and line."""

from __future__ import annotations

import textwrap

import pytest

from loom_common.errors import SpecError, SpecIssue
from loom_common.graph import load_graph


def issues_of(text: str) -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        load_graph(textwrap.dedent(text))
    return info.value.issues


def one_issue(text: str) -> SpecIssue:
    issues = issues_of(text)
    assert len(issues) == 1, issues
    return issues[0]


def test_a_valid_graph_loads_with_topological_order_and_defaults_applied() -> None:
    graph = load_graph(
        textwrap.dedent(
            """
            name: build-and-deploy
            defaults: {timeout: 10m, retries: 2, retry_delay: 1s, retry_max_delay: 1m}
            params:
              ref: {type: string, default: main}
            nodes:
              deploy:
                needs: [build]
                run: echo deploy
                timeout: 1h30m
              build:
                run: echo "${{ params.ref }}"
            """
        )
    )
    assert graph.order == ("build", "deploy")
    assert graph.nodes["deploy"].timeout == 5400
    assert graph.nodes["build"].timeout == 600
    assert graph.nodes["build"].retries == 2
    assert graph.nodes["build"].retry_max_delay == 60
    assert graph.ancestors["deploy"] == {"build"}


def test_unknown_need_names_path_line_and_suggestion() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          test:
            run: "true"
          deploy:
            needs: [test, tset]
            run: "true"
        """
    )
    assert issue.path == "nodes.deploy.needs[1]"
    assert issue.line == 7
    assert "unknown node 'tset' (did you mean 'test'?)" in issue.message


def test_self_need_is_an_error() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a: {run: "true", needs: [a]}
        """
    )
    assert issue.path == "nodes.a.needs[0]"
    assert "cannot need itself" in issue.message


def test_cycle_is_named() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a: {run: "true", needs: [c]}
          b: {run: "true", needs: [a]}
          c: {run: "true", needs: [b]}
        """
    )
    assert issue.message.startswith("cycle: ")
    names = issue.message.removeprefix("cycle: ").split(" -> ")
    assert set(names) == {"a", "b", "c"} and names[0] == names[-1]
    assert issue.line == 4


def test_unknown_field_suggests_the_right_one() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a:
            rn: echo hi
        """
    )
    assert issue.path == "nodes.a.rn"
    assert issue.line == 5
    assert "unknown field 'rn' (did you mean 'run'?)" in issue.message


def test_unknown_top_level_and_trigger_fields() -> None:
    issues = issues_of(
        """
        name: g
        descripton: typo
        triggers:
          - cron: "0 2 * * *"
            timezon: Europe/Berlin
        nodes:
          a: {run: "true"}
        """
    )
    assert [(i.path, i.line) for i in issues] == [("descripton", 3), ("triggers[0].timezon", 6)]
    assert "did you mean 'description'" in issues[0].message
    assert "did you mean 'timezone'" in issues[1].message


def test_duplicate_keys_are_rejected_with_both_lines() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a: {run: "true"}
          a: {run: "false"}
        """
    )
    assert issue.line == 5
    assert "duplicate key 'a' (first defined at line 4)" in issue.message


@pytest.mark.parametrize(
    ("snippet", "path", "fragment"),
    [
        ("timeout: 10 minutes", "nodes.a.timeout", "expected a duration"),
        ("timeout: -5", "nodes.a.timeout", "cannot be negative"),
        ("retries: many", "nodes.a.retries", "integer"),
        ("shell: zsh", "nodes.a.shell", "'bash' or 'sh'"),
        ("max_parallel: 2", "nodes.a", "`max_parallel` needs `for_each`"),
        ("with: {x: 1}", "nodes.a", "`with` is for python and graph nodes"),
        ("python: not-a-target", "nodes.a.python", "must be module:function"),
    ],
)
def test_node_field_errors(snippet: str, path: str, fragment: str) -> None:
    issues = issues_of(
        f"""
        name: g
        nodes:
          a:
            run: "true"
            {snippet}
        """
    )
    assert any(i.path == path and fragment in i.message for i in issues), issues
    assert all(i.line is not None for i in issues)


def test_node_with_two_kinds_or_none() -> None:
    issues = issues_of(
        """
        name: g
        nodes:
          a: {run: "true", python: "m:f"}
          b: {needs: [a]}
        """
    )
    assert [i.path for i in issues] == ["nodes.a", "nodes.b"]
    assert "(found run, python)" in issues[0].message
    assert "(found none)" in issues[1].message


def test_invalid_names() -> None:
    issues = issues_of(
        """
        name: Build_Deploy
        nodes:
          "1bad": {run: "true"}
        """
    )
    assert [i.path for i in issues] == ["name", "nodes.1bad"]
    assert "invalid node id '1bad'" in issues[1].message
    assert "must be lower-case letters" in issues[0].message


def test_missing_name_and_nodes() -> None:
    issues = issues_of("description: nothing\n")
    assert {i.path for i in issues} == {"name", "nodes"}
    assert all("is required" in i.message for i in issues)


def test_every_error_is_collected_not_just_the_first() -> None:
    issues = issues_of(
        """
        name: g
        nodes:
          a: {run: "true", needs: [zz]}
          b: {run: "echo ${{ nodes.a.outputs.x }}"}
          c: {run: "echo ${{ parms.x }}"}
        """
    )
    assert [i.line for i in issues] == [4, 5, 6]


def test_yaml_syntax_error_has_a_line() -> None:
    issue = one_issue("name: g\nnodes:\n  a: {run: [unclosed\n")
    assert issue.message.startswith("invalid YAML")
    assert issue.line is not None


def test_json_documents_load_too() -> None:
    graph = load_graph('{"name": "g", "nodes": {"a": {"run": "true"}}}')
    assert graph.order == ("a",)


def test_a_document_that_is_not_a_mapping() -> None:
    assert "a graph must be a mapping" in one_issue("- a\n- b\n").message


# --- templates -----------------------------------------------------------------------


def test_template_syntax_error_points_at_the_line_inside_a_block() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a:
            run: |
              echo one
              echo ${{ params. }}
        """
    )
    assert issue.path == "nodes.a.run"
    assert issue.line == 7
    assert "invalid expression" in issue.message


def test_reference_to_a_node_that_is_not_upstream() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a: {run: "true"}
          b: {run: "echo ${{ nodes.a.outputs.x }}"}
        """
    )
    assert issue.path == "nodes.b.run"
    assert "node 'a' is not upstream of 'b': add it to `needs`" in issue.message


def test_transitive_upstream_reference_is_allowed() -> None:
    load_graph(
        textwrap.dedent(
            """
            name: g
            nodes:
              a: {run: "true"}
              b: {run: "true", needs: [a]}
              c: {run: "echo ${{ nodes.a.outputs.x }} ${{ nodes['b'].status }}", needs: [b]}
            """
        )
    )


@pytest.mark.parametrize(
    ("place", "fragment"),
    [
        ("env:\n  X: ${{ nodes.a.status }}", "'nodes' is not available here"),
        ("env:\n  X: ${{ item }}", "'item' is not available here"),
        (
            "nodes:\n  z: {run: 'echo ${{ item }}'}",
            "'item' is only defined in a node with `for_each`",
        ),
        (
            "nodes:\n  z: {run: 'echo ${{ success() }}'}",
            "success() can only be used in a node's `if`",
        ),
        ("nodes:\n  z: {run: 'echo ${{ payload.x }}'}", "'payload' is not available here"),
        (
            "triggers:\n  - cron: '* * * * *'\n    params: {p: '${{ params.p }}'}",
            "'params' is not available here",
        ),
        (
            "triggers:\n  - webhook: {auth: none, params: {p: '${{ secrets.X }}'}}",
            "'secrets' is not available here",
        ),
    ],
)
def test_names_outside_their_place_context(place: str, fragment: str) -> None:
    text = "name: g\nparams:\n  p: {type: string, default: x}\n" + place + "\n"
    if not place.startswith("nodes:"):
        text += "nodes:\n  a: {run: 'true'}\n"
    issues = issues_of(text)
    assert any(fragment in i.message for i in issues), issues


def test_status_functions_in_if_and_bare_if_expressions() -> None:
    graph = load_graph(
        textwrap.dedent(
            """
            name: g
            nodes:
              a: {run: "true"}
              b: {run: "true", needs: [a], if: "${{ always() }}"}
              c: {run: "true", needs: [a], if: "failure() or nodes.a.status == 'skipped'"}
            """
        )
    )
    assert graph.nodes["c"].if_ is not None


def test_for_each_must_be_a_list_or_an_expression() -> None:
    issue = one_issue(
        """
        name: g
        nodes:
          a: {run: "true", for_each: "eu,us"}
        """
    )
    assert "`for_each` takes a list or a ${{ }} expression" in issue.message


# --- params and triggers -------------------------------------------------------------


def test_param_defaults_and_enums_must_match_their_type() -> None:
    issues = issues_of(
        """
        name: g
        params:
          count: {type: integer, default: "three"}
          mode: {type: string, enum: [fast, 2], default: slow}
        nodes:
          a: {run: "true"}
        """
    )
    messages = {i.path: i.message for i in issues}
    assert "expected integer, got string" in messages["params.count.default"]
    assert "expected string, got integer" in messages["params.mode.enum[1]"]
    assert "'slow' is not one of" in messages["params.mode.default"]


def test_trigger_errors() -> None:
    issues = issues_of(
        """
        name: g
        params:
          dry: {type: boolean, default: false}
        triggers:
          - cron: "61 * * * *"
          - cron: "0 2 * * *"
            timezone: Europe/Berln
          - at: "2026-12-24 18:00"
          - every: 0s
          - cron: "0 3 * * *"
            params: {dyr: true}
          - cron: "0 4 * * *"
            params: {dry: "yes"}
        nodes:
          a: {run: "true"}
        """
    )
    by_line = {i.line: i for i in issues}
    assert "minute" in by_line[6].message
    assert by_line[8].path == "triggers[1].timezone" and "Europe/Berln" in by_line[8].message
    assert by_line[9].path == "triggers[2].at"
    assert by_line[10].path == "triggers[3].every"
    assert "unknown param 'dyr' (did you mean 'dry'?)" in by_line[12].message
    assert "expected boolean, got string" in by_line[14].message


def test_trigger_field_errors() -> None:
    issues = issues_of(
        """
        name: g
        triggers:
          - webhook: {auth: github}
          - {cron: "0 5 * * *", every: 5m}
          - webhook: {auth: none, secret: X}
        nodes:
          a: {run: "true"}
        """
    )
    assert [i.line for i in issues] == [4, 5, 6]
    assert "needs `secret`" in issues[0].message
    assert "exactly one of cron, every, delay, at, webhook" in issues[1].message
    assert "auth 'none' takes no secret" in issues[2].message


def test_duplicate_trigger_ids_and_webhook_names() -> None:
    issues = issues_of(
        """
        name: g
        triggers:
          - {cron: "0 2 * * *", id: nightly}
          - {cron: "0 3 * * *", id: nightly}
          - webhook: {auth: none}
          - webhook: {auth: none, name: default}
        nodes:
          a: {run: "true"}
        """
    )
    assert any("trigger id 'nightly'" in i.message for i in issues)
    assert any("webhook 'default' is defined twice" in i.message for i in issues)


def test_default_trigger_ids_are_stable_when_triggers_are_reordered() -> None:
    one = "  - cron: '0 2 * * *'\n    timezone: Europe/Berlin\n  - every: 15m\n"
    two = "  - every: 15m\n  - cron: '0 2 * * *'\n    timezone: Europe/Berlin\n"
    ids = []
    for triggers in (one, two):
        graph = load_graph("name: g\ntriggers:\n" + triggers + "nodes:\n  a: {run: 'true'}\n")
        ids.append(sorted(t.id for t in graph.triggers))
    assert ids[0] == ids[1]
    assert len(set(ids[0])) == 2


def test_needs_and_cycles_are_reported_alongside_field_errors() -> None:
    issues = issues_of(
        """
        name: g
        nodes:
          a: {run: "true", timeout: soon, needs: [b]}
          b: {run: "true", needs: [a, nope]}
        """
    )
    messages = [(i.line, i.message) for i in issues]
    assert any(line == 4 and "expected a duration" in m for line, m in messages)
    assert any(line == 5 and "unknown node 'nope'" in m for line, m in messages)
    assert any(m.startswith("cycle: ") for _, m in messages)


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ("{run: 'true', if: failure}", "failure is a function: write failure()"),
        ("{run: 'true', if: 'x ${{ true }}'}", "`if` takes one expression"),
        ("{run: 'true', timeout: 0s}", "a timeout must be longer than 0s"),
        ("{run: 'true', retries: '3'}", "valid integer"),
        ("{run: 'true', continue_on_failure: 'yes'}", "valid boolean"),
        ("{run: 'true', env: {'A=B': x}}", "invalid variable name 'A=B'"),
        ("{run: \"cat <<'EOF'\\n${{ params.p }}\\nEOF\\n\"}", "quoted heredoc"),
        ("{run: 'true', for_each: '${{ item }}'}", "not defined in `for_each` itself"),
    ],
)
def test_more_node_errors(node: str, fragment: str) -> None:
    issues = issues_of(f"name: g\nparams: {{p: {{default: x}}}}\nnodes:\n  a: {node}\n")
    assert any(fragment in i.message for i in issues), issues
    assert all(i.line == 4 for i in issues), issues


def test_boolean_and_block_ifs_are_expressions() -> None:
    graph = load_graph(
        "name: g\nnodes:\n  a: {run: 'true', if: false}\n  b:\n    run: 'true'\n    if: |\n      ${{ true }}\n"
    )
    assert graph.nodes["a"].if_ is not None and graph.nodes["b"].if_ is not None


def test_hyphenated_node_ids_get_a_hint() -> None:
    issues = issues_of(
        "name: g\nnodes:\n  build-app: {run: 'true'}\n  b: {needs: [build-app], run: 'echo ${{ nodes.build-app.status }}'}\n"
    )
    assert any("nodes['build-app']" in i.message for i in issues)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: g\nnodes:\n  a:\n    run: >\n      echo one\n\n      echo ${{ params. }}\n", 7),
        ('name: g\nnodes:\n  a:\n    run: "echo one\n      two ${{ nope }}"\n', 5),
    ],
)
def test_lines_are_right_in_folded_and_quoted_scalars(text: str, line: int) -> None:
    issue = one_issue(text)
    assert issue.line == line


@pytest.mark.parametrize(
    "text",
    [
        "name: g\nnodes: {!!python/name:os.system a: {run: echo}}\n",
        "name: g\nnodes: {!!int abc: {run: echo}}\n",
        "name: g\nconcurrency: " + "9" * 5000 + "\nnodes: {a: {run: 'true'}}\n",
        "name: g\nx: " + "[" * 5000 + "]" * 5000 + "\n",
        "name: g\nnodes: {a: {run: 'echo ${{ " + "(" * 3000 + "1" + ")" * 3000 + " }}'}}\n",
    ],
)
def test_hostile_documents_give_spec_errors(text: str) -> None:
    assert issues_of(text)


def test_an_integer_beyond_64_bits_is_an_error_on_its_line() -> None:
    """The API, the JSON columns and the messages carry 64-bit integers: a bigger one
    would be stored and then fail every answer that shows it."""
    text = (
        "name: g\nparams:\n  o: {type: object, default: {x: 99999999999999999999}}\n"
        "nodes: {a: {run: 'true'}}\n"
    )
    issues = issues_of(text)
    assert [(i.line, "64 bits" in i.message) for i in issues] == [(3, True)]
    biggest = load_graph(text.replace("99999999999999999999", "9223372036854775807"))
    assert biggest.spec.params["o"].default == {"x": 2**63 - 1}
