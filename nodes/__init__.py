"""Collects the pack's node classes into ComfyUI's mappings."""

from . import (  # noqa: F401  (web_routes registers HTTP routes)
    ab_nodes,
    adapter_nodes,
    config_nodes,
    dev_models,
    export_nodes,
    preview_nodes,
    schedule_nodes,
    tlora_visualizer,
    train_nodes,
    validation_nodes,
    variant_nodes,
    web_routes,
)

NODE_CLASSES = [
    *config_nodes.NODES,
    *adapter_nodes.NODES,
    *variant_nodes.NODES,
    *ab_nodes.NODES,
    *train_nodes.NODES,
    *validation_nodes.NODES,
    *export_nodes.NODES,
    *tlora_visualizer.NODES,
    *dev_models.NODES,
    *preview_nodes.NODES,
    *schedule_nodes.NODES,
]

NODE_CLASS_MAPPINGS = {cls.define_schema().node_id: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS = {
    cls.define_schema().node_id: cls.define_schema().display_name for cls in NODE_CLASSES
}
