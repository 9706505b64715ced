"""LyCORIS node pack for ComfyUI: registration only."""

import os

import folder_paths

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

# The small SimpleTuner-format file example workflow 06 loads ships in example_workflows/loras/: listed
# among the loras (after models/loras, which stays where files are written) as lycoris-examples/...
folder_paths.add_model_folder_path("loras", os.path.join(os.path.dirname(__file__), "example_workflows", "loras"))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
