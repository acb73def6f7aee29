"""What the writers and the TensorBoard tab agree on: the plugin's name, its tag and its payload.

Torch-free and tensorboard-free, so the writer and the plugin can both import it cheaply.
"""

from __future__ import annotations

PLUGIN_NAME = "initdoctor"
# One tag per run: the whole diagnosis (DESIGN §2 JSON) of one sampled step, as a UTF-8 JSON string.
DIAGNOSIS_TAG = "initdoctor.diagnosis"
# Stored in SummaryMetadata.plugin_data.content; bump when the payload changes shape.
CONTENT_VERSION = b'{"version": 1}'
