"""Write configs/dvc/plots.html: DVC's `dvc plots show` page with Vega inlined, so the plots render offline (DVC's
own page loads Vega from a CDN and is blank without a network). .dvc/config points `plots.html_template` at it.

    pip download panel==1.9.4 --no-deps -d /tmp/panel    # the package registry's panel wheel bundles Vega
    python scripts/vendor_vega.py /tmp/panel/panel-1.9.4-py3-none-any.whl

Vega, Vega-Lite and vega-embed are BSD-3-Clause (https://github.com/vega); the files are copied unchanged.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "configs/dvc/plots.html"
BUNDLES = ("vega@6.1.2", "vega-lite@6.3.0", "vega-embed@7.0.2")  # in load order: embed needs the other two
PREFIX = "panel/dist/bundled/vegaplot/"

PAGE = """<!DOCTYPE html>
<!-- dvc plots show, offline: Vega {versions} inlined (BSD-3-Clause, https://github.com/vega), written by
     scripts/vendor_vega.py from the panel wheel of the package registry. -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>alignflow: DVC plots</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        scripts = "\n".join(f"    <script>/* {name} */\n{z.read(PREFIX + name).decode()}\n    </script>" for name in BUNDLES)
    # the page is a template: DVC replaces {plot_divs} and {refresh_tag} (str.replace, so the scripts' braces are safe)
    OUT.write_text(PAGE.format(versions=", ".join(BUNDLES), scripts=scripts))
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1])
