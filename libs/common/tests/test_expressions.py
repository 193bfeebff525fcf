"""`${{ }}` templates: sandboxed, strict, and safe to paste into shell scripts."""

from __future__ import annotations

import subprocess

import pytest

from loom_common.errors import ExpressionError
from loom_common.expressions import compile_template, render_shell, render_value, to_text


def render(text: str, **context: object) -> object:
    compiled = compile_template(text)
    return render_value(compiled, context)


def test_text_without_templates_is_left_alone() -> None:
    for text in ("plain", "{% if x %}", "{# c #}", "{{ x }}", "${#var}", "${HOME}"):
        assert compile_template(text) == text


def test_a_lone_expression_keeps_its_type() -> None:
    assert render("${{ params.regions }}", params={"regions": ["eu", "us"]}) == ["eu", "us"]
    assert render("${{ 1 + 2 }}") == 3
    assert render("  ${{ 1 + 2 }}") == "  3"


def test_text_rendering_of_values() -> None:
    assert render("a=${{ x }} b=${{ y }} c=${{ z }} d=${{ w }}", x=True, y=None, z=[1], w=1.5) == (
        "a=true b= c=[1] d=1.5"
    )
    assert to_text({"k": "v"}) == '{"k":"v"}'


def test_undefined_names_are_errors_never_empty_strings() -> None:
    with pytest.raises(ExpressionError, match="'nme' is undefined"):
        render("hello ${{ params.nme }}", params={"name": "x"})
    with pytest.raises(ExpressionError, match="undefined"):
        render("${{ nothing }}")


def test_the_sandbox_blocks_python_internals() -> None:
    for source in (
        "${{ ''.__class__.__mro__ }}",
        "${{ params.__init__ }}",
        "${{ x.append(1) }}",
    ):
        with pytest.raises(ExpressionError):
            render(source, params={}, x=[])


def test_no_jinja_globals_leak_in() -> None:
    for name in ("range", "lipsum", "cycler", "namespace", "dict"):
        with pytest.raises(ExpressionError):
            render(f"${{{{ {name} }}}}")


def test_filters_work_including_tojson_and_fromjson() -> None:
    assert render("${{ xs | join(',') }}", xs=["a", "b"]) == "a,b"
    assert render("${{ d | tojson }}", d={"a": [1, 2]}) == '{"a":[1,2]}'
    assert render("${{ (s | fromjson).a }}", s='{"a": 5}') == 5


@pytest.mark.parametrize(
    "text", ["${{ }}", "${{ params. }}", "${{ a b }}", "x ${{ unterminated", "${{ nodes[x] }}"]
)
def test_syntax_errors_are_found_at_compile_time(text: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_template(text)
    assert getattr(info.value, "offset", None) is not None


def test_node_references_are_collected() -> None:
    template = compile_template("${{ nodes.a.outputs.x }} ${{ nodes['b-c'].status }}")
    assert not isinstance(template, str)
    refs = set().union(*(e.node_refs for e in template.exprs))
    assert refs == {"a", "b-c"}


def sh(script: str, env: dict[str, str]) -> str:
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.parametrize(
    "value",
    ["bob", "$(id)", "`id`", "a; id", "a\nid", 'say "hi"', "it's", "$HOME", "*", "a  b", ""],
)
def test_render_shell_quotes_values_wherever_they_stand(value: str) -> None:
    template = compile_template(
        "echo \"in double: ${{ v }}\"\necho ${{ v }}\necho 'in single: ${{ v }}'\n"
    )
    script, env = render_shell(template, {"v": value})
    assert value not in script or value in ("bob", "", "*", "a  b")
    assert sh(script, env) == f"in double: {value}\n{value}\nin single: {value}\n"


def test_hello_bob_reads_as_it_would_in_any_shell_script() -> None:
    script, env = render_shell(
        compile_template('echo "hello ${{ params.name }}"'), {"params": {"name": "bob"}}
    )
    assert script == 'echo "hello ${LOOM_X_1}"'
    assert sh(script, env) == "hello bob\n"


def test_raw_pastes_the_text() -> None:
    script, env = render_shell(compile_template("${{ cmd | raw }}"), {"cmd": "echo hi"})
    assert script == "echo hi" and env == {}


def test_attribute_access_on_mappings_reads_keys_not_methods() -> None:
    assert render("${{ params.items | length }}", params={"items": [1, 2, 3]}) == 3
    with pytest.raises(ExpressionError, match="'keys' is undefined"):
        render("${{ params.keys }}", params={})
