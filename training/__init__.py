"""How the shipped small SAM (``checkpoints/sam_tiny.pt``, model type ``sam_tiny``) is trained: not
part of the installed product (``training/README.md``). Run from the repository root, e.g.
``python -m training.time_pretrain``; imports the library (``stable_sam``), never the server."""
