"""Label Studio ML backend serving Stable-SAM: smart keypoints and rectangles -> brush masks.

``backend.app.create_app()`` is the Flask app factory (``backend.wsgi:app`` for gunicorn);
``backend.model.StableSamBackend`` holds the label-studio-ml style ``predict`` / ``fit`` interface.
"""
