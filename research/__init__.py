"""Research on synthetic worlds and oracles: questions asked while building Stable-SAM, not part of
the installed product (``research/README.md``). Run from the repository root, e.g.
``python -m research.run_same_set_oracle``; imports the library (``stable_sam``), never the server."""
