"""Label Studio ML backend serving Stable-SAM: smart keypoints and rectangles -> brush masks.

``backend.app.create_app()`` is the Flask app factory (``backend.wsgi:app`` for gunicorn);
``backend.ml_backend.StableSamBackend`` holds the label-studio-ml style ``predict`` / ``fit`` interface.
"""
