"""The README's option tables and exit codes against build_parser() and the EXIT_* constants."""

import re
from pathlib import Path

from conftest import REPO, ub

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_options() -> dict[str, str]:
    """Every option in the README's tables: its name and the default column."""
    found = {}
    for line in README.splitlines():
        match = re.match(r"\| `(--[a-z0-9-]+)[^`]*` \|([^|]*)\|", line)
        if match:
            found.setdefault(match.group(1), match.group(2).strip())  # the option tables come first
    return found


def parser_actions() -> dict[str, object]:
    return {a.option_strings[-1]: a for a in ub.build_parser()._actions if a.option_strings and a.dest != "help"}


def test_every_option_is_in_the_readme_and_every_readme_option_exists():
    documented, actual = set(readme_options()), set(parser_actions())
    assert documented - actual == set(), "README documents options the program lacks"
    assert actual - documented == set(), "options missing from the README's tables"


def test_the_readme_states_each_default():
    documented = readme_options()
    for name, action in parser_actions().items():
        default = action.default
        if default in (None, False) or isinstance(default, Path):
            continue  # "off", "none", a folder: worded in the README, checked by hand
        assert str(default) in documented[name], (name, default, documented[name])


def test_every_exit_code_is_documented_in_the_readme_and_the_help():
    paragraph = README.split("Exit codes:")[1].split("\n\n")[0]
    help_text = " ".join(ub.build_parser().format_help().split())
    codes = {name: value for name, value in vars(ub).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert len(codes) == 8
    for name, value in codes.items():
        assert re.search(rf"(^|[;,:\s]){value} ", paragraph), (name, value)
        assert re.search(rf"(^|[;,:\s]){value} ", help_text.split("Exit codes:")[1]), (name, value)
    documented = {int(n) for n in re.findall(r"(?:^|[;,]\s*|\n)(\d+) ", paragraph)}
    assert documented <= set(codes.values()) | {130, 143}, documented


def test_the_module_docstring_maps_every_section_in_file_order():
    source = (REPO / "unified_benchmark.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    banners = [re.split(r"[:(]", lines[i + 1][2:])[0].strip() for i, line in enumerate(lines[:-2])  # a title between rules
               if line.startswith("# ---") and lines[i + 2].startswith("# ---") and not lines[i + 1].startswith("# ---")]
    mapped = [line[4:30].strip() for line in ub.__doc__.split("Sections, in dependency order:")[1].splitlines()
              if line.startswith("    ")]
    short = {"Deployment options and compute": "Deployment and compute"}
    assert [short.get(b, b) for b in banners] == mapped
