"""Test support, never imported by the product (``tests/test_layers.py`` checks it): what the tests,
the benchmarks and the soak script share.

- ``drawn_scene``: a drawn test image with known object masks;
- ``label_studio_regions``: keypoints and rectangles as the labeling screen sends them, an
  annotator's click session, and the bare predictor's answer to them;
- ``local_server``: the backend under gunicorn on 127.0.0.1 and a free port;
- ``loopback_guard``: refuse every connection outside loopback (the tests, the soak script).
"""
