"""Video and image files (PyAV): reading, probing, writing atomically."""
