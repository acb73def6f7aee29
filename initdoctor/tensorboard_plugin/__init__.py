"""initdoctor's TensorBoard tab (plugin.py, static/) and what the writers agree with it on (metadata.py)."""
