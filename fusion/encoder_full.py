"""The whole encoders, trained end to end with the fusion and head (`vlpipe train --finetune
full`): the image encoder on decoded pixels, BERT on token ids, in place of their caches.

`LiveEncoders` holds an image extractor rebuilt trainable (vit, cnn / resnet: the very model,
transform and output fields extraction used, so on an image in eval mode it gives the cached
features) and a BertModel. Before the fusion it turns a batch's `pixels` (B, 3, H, W uint8, as
the extraction transform made them) and `text_ids` / `text_mask` into the fields a cache of
the same encoders gives: image_cls (and the CLS / pooled vector + patches / cells as regions
over the grid, for a patch or grid cache), text_feats and text_cls.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpipe.extract.base import Batch, Extractor, ImageTransform
from vlpipe.fusion.encoder_top import patch_regions


class LiveEncoders(nn.Module):
    """`vision`: an image Extractor (its model trains), `text`: a transformers BertModel;
    either may be None (that side is read from its cache, frozen). `grid`: the patch / cell
    grid of a vision extractor that gives patch tokens (None: image_cls only)."""

    def __init__(
        self,
        vision: Extractor | None = None,
        text: nn.Module | None = None,
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        if vision is not None:
            vision.model.requires_grad_(True)
        if text is not None:
            text.requires_grad_(True)
        self.vision, self.text, self.grid = vision, text, grid

    @property
    def transform(self) -> ImageTransform | None:
        """How the dataset turns an image file into `pixels` (run in DataLoader workers)."""
        return self.vision.transform if self.vision is not None else None

    @property
    def needs(self) -> tuple[str, ...]:
        return (("pixels",) if self.vision else ()) + (
            ("text_ids", "text_mask") if self.text else ()
        )

    @property
    def provides(self) -> tuple[str, ...]:
        vision = ("image_cls",) + (
            ("region_feats", "region_boxes", "region_mask") if self.grid else ()
        )
        return (vision if self.vision else ()) + (("text_feats", "text_cls") if self.text else ())

    def gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass (memory for time)."""
        if self.vision is not None:
            self.vision.model.set_grad_checkpointing(True)
        if self.text is not None:
            enable = getattr(self.text, "activation_checkpointing_enable", None)
            (enable or self.text.gradient_checkpointing_enable)()  # the name before v5.x

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        if self.vision is not None:
            out = self.vision.encode(Batch(pixels=list(batch["pixels"])))
            batch["image_cls"] = out["image_cls"]
            if self.grid is not None:
                tokens = torch.cat([out["image_cls"][:, None], out["image_feats"]], 1)
                batch.update(patch_regions(tokens, self.grid))
        if self.text is not None:
            hidden = self.text(
                input_ids=batch["text_ids"], attention_mask=batch["text_mask"].long()
            ).last_hidden_state
            batch["text_feats"], batch["text_cls"] = hidden, hidden[:, 0]
        return batch
