"""The command-line tools, installed as the package ``stable_sam_cli`` (pyproject.toml): each
``scripts/X.py`` runs as ``python scripts/X.py`` or as the console script ``stable-sam-X``. A script
imports the library (``stable_sam``) and the server layer (``backend``), never tests/ or another
script."""
