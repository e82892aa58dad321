"""A project's labeling config, read for what Stable-SAM needs: which brush control answers for
which image, which task data key holds the image, and whether a prompt region fits the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence

from label_studio_sdk.label_interface import LabelInterface

from stable_sam.data.label_studio_prompts import (KEYPOINT_CONTROL_TAGS, PROMPT_CONTROL_TAGS, RECTANGLE_CONTROL_TAGS,
                                                  PromptGroup, Region)

from .errors import BadInput, clip


@dataclass(frozen=True)
class ParsedConfig:
    interface: LabelInterface
    controls: Dict[str, Any]  # name -> control tag
    brush_by_image: Dict[str, Any]  # Image tag name -> its first BrushLabels control
    image_keys: Dict[str, str]  # Image tag name -> task data key


def parse_label_config(config: Any) -> ParsedConfig:
    """Parse a label config (``StableSamBackend.label_config`` caches them); 4xx when it cannot
    serve brush masks."""
    if config is not None and not isinstance(config, str):
        raise BadInput(f"label_config must be a string (the labeling config's XML), got {type(config).__name__}")
    if not config or not config.strip():
        raise BadInput("no label config: send 'label_config' with /predict or connect through /setup first")
    try:
        li = LabelInterface(config)
    except Exception as e:  # the SDK raises many types for a broken XML
        raise BadInput(f"label config cannot be parsed: {str(e)[:300]}") from None
    controls = {c.name: c for c in (li.controls or [])}
    images = {obj.name: obj for obj in (li.objects or []) if obj.tag == "Image"}
    brush: Dict[str, Any] = {}
    for c in controls.values():
        if c.tag == "BrushLabels":
            for to in c.to_name:
                if to in images:
                    brush.setdefault(to, c)
    if not brush:
        raise BadInput("the label config has no <BrushLabels> control on an <Image>: Stable-SAM answers "
                       "with brush masks; use label_config/recommended.xml")
    keys = {name: obj.value_name for name, obj in images.items() if obj.value_name}
    return ParsedConfig(li, controls, brush, keys)


def output_label(group: PromptGroup, brush: Any) -> str:
    """The brush label a prompt's mask gets: the prompt's own label (case folded if need be), or
    the brush control's only label; 4xx when neither fits."""
    labels = list(brush.labels or [])
    if group.label is not None and group.label in labels:
        return group.label
    if group.label is not None:
        folded = {v.casefold(): v for v in labels}
        if group.label.casefold() in folded:
            return folded[group.label.casefold()]
    if group.label is None and len(labels) == 1:
        return labels[0]
    if group.label is None:
        raise BadInput(f"the prompt ({clip(', '.join(group.source_ids))}) has no label and brush control "
                       f"'{brush.name}' has several ({clip(labels, 300)}): use labelled keypoints / rectangles")
    raise BadInput(f"label {clip(group.label)} of {clip(group.from_name)} is not a label of brush control "
                   f"'{brush.name}' ({clip(labels, 300)}): give both controls the same labels")


def check_regions(cfg: ParsedConfig, regions: Sequence[Region]) -> None:
    """4xx unless every region comes from a keypoint / rectangle control of ``cfg`` on an image
    that a brush control labels."""
    for r in regions:
        control = cfg.controls.get(r.from_name)
        rid = clip(r.id, 40)
        if control is None:
            raise BadInput(f"unknown from_name {clip(r.from_name)} (region {rid}): the label config's controls "
                           f"are {clip(sorted(cfg.controls), 300)}")
        if control.tag not in PROMPT_CONTROL_TAGS:
            raise BadInput(f"from_name {clip(r.from_name)} (region {rid}) is a <{control.tag}>, not a keypoint "
                           f"or rectangle control")
        expected = KEYPOINT_CONTROL_TAGS if r.kind == "keypoint" else RECTANGLE_CONTROL_TAGS
        if control.tag not in expected:
            raise BadInput(f"region {rid} is a {r.kind}, but its from_name {clip(r.from_name)} is a "
                           f"<{control.tag}>: send it with a {' / '.join(expected)} control")
        if r.to_name not in control.to_name:
            raise BadInput(f"to_name {clip(r.to_name)} (region {rid}) is not an object of control "
                           f"{clip(r.from_name)} (it labels {clip(control.to_name, 300)})")
        if r.to_name not in cfg.brush_by_image:
            raise BadInput(f"no <BrushLabels> control in the label config is paired with image {clip(r.to_name)}")
