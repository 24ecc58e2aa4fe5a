"""The README's configuration table is generated from Settings and must match it."""

from server.config import ROOT
from tools.settings_table import table


def test_readme_configuration_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings:start -->\n") + len("<!-- settings:start -->\n")
    end = readme.index("<!-- settings:end -->")
    assert readme[start:end] == table(), (
        "run `python -m tools.settings_table` and paste it into README.md"
    )
