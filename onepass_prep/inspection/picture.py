"""`inspect --png`: the whole mask of a row as a picture, with segment boundaries, role
colours (trained turns of weight other than 1 in their own) and a legend. Rows up to GRID_PX tokens get whole pixels per token; longer rows are
downsampled by blocks exactly as in the terminal (see `maskgrid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onepass_prep.inspection.maskgrid import mask_grid
from onepass_prep.inspection.roles import ROLE_COLOURS, ROLE_NAMES, Role
from onepass_prep.inspection.view import RowView

GRID_PX = 1000  # the mask's side in pixels, at most
LEFT, TOP = 70, 64  # where the mask's top-left pixel sits
FUTURE = (255, 255, 255)  # key after query
MASKED = (222, 222, 222)  # causal, but not visible
BOUNDARY = (60, 60, 60)
TEXT = (20, 20, 20)
MIN_SHADE = 0.35  # a cell with any visible pair is never paler than this


def cell_layout(length: int) -> tuple[int, int]:
    """(cells per side, pixels per cell): one cell per token while that fits in GRID_PX."""
    cells = min(length, GRID_PX)
    return cells, max(1, round(GRID_PX / cells))


def mask_picture(view: RowView) -> Image.Image:
    row = view.row
    cells, scale = cell_layout(len(row))
    grid = mask_grid(row, view.parts, cells)
    count = len(grid.edges) - 1
    pixels = _cell_colours(grid) if count else np.zeros((0, 0, 3), np.uint8)
    mask = Image.fromarray(pixels, "RGB").resize((count * scale,) * 2, Image.Resampling.NEAREST)
    side = count * scale
    font = ImageFont.load_default(size=14)
    roles = [role for role in Role if role not in (Role.DOWN, Role.UP) or (view.roles == role).any()]
    legend_rows = len(roles) + 3
    image = Image.new("RGB", (LEFT + max(side, 520) + 60, TOP + side + 30 + 20 * legend_rows), FUTURE)
    image.paste(mask, (LEFT, TOP))
    draw = ImageDraw.Draw(image)
    draw.text(
        (LEFT, 8),
        f"{row.file.name} row {row.index} ({_names(row.conversation_ids)}): {len(row):,} tokens, "
        f"{len(row.seg_lens)} segments, 1 cell = {grid.block}x{grid.block} tokens",
        fill=TEXT, font=font,
    )
    draw.text((LEFT, 30), "key ->", fill=TEXT, font=font)
    draw.text((8, 30), "query", fill=TEXT, font=font)
    _boundaries(draw, row.seg_starts.tolist(), grid.block, scale, side)
    for tick in range(0, count, max(1, count // 5)):
        label = str(int(grid.edges[tick]))
        draw.text((LEFT + tick * scale, TOP - 20), label, fill=TEXT, font=font)
        draw.text((8, TOP + tick * scale), label, fill=TEXT, font=font)
    y = TOP + side + 20
    entries = [(ROLE_COLOURS[role], ROLE_NAMES[role]) for role in roles]
    entries += [(MASKED, "masked: causal but not visible"), (FUTURE, "key after query")]
    for colour, name in entries:
        draw.rectangle((LEFT, y, LEFT + 14, y + 14), fill=colour, outline=BOUNDARY)
        draw.text((LEFT + 22, y - 1), name, fill=TEXT, font=font)
        y += 20
    draw.line((LEFT, y + 7, LEFT + 14, y + 7), fill=BOUNDARY, width=2)
    draw.text((LEFT + 22, y - 1), "segment start (ticks; lines while cells are >= 3 px)", fill=TEXT, font=font)
    return image


def save_mask_picture(view: RowView, path: Path) -> tuple[int, int]:
    image = mask_picture(view)
    image.save(path, format="PNG")
    return image.size


def _names(ids: list[str]) -> str:
    return ", ".join(ids) if len(ids) <= 3 else f"{ids[0]}, … {len(ids)} conversations"


def _cell_colours(grid) -> np.ndarray:
    """RGB per cell: the key role's colour, paler where fewer of the causal pairs are visible."""
    role_rgb = np.array([ROLE_COLOURS[role] for role in Role], float)
    fraction = grid.fraction
    shade = np.where(fraction > 0, MIN_SHADE + (1 - MIN_SHADE) * fraction, 0)[..., None]
    colours = shade * role_rgb[grid.role] + (1 - shade) * np.array(MASKED, float)
    colours[grid.causal == 0] = FUTURE
    return np.rint(colours).astype(np.uint8)


def _boundaries(draw: ImageDraw.ImageDraw, starts: list[int], block: int, scale: int, side: int) -> None:
    """Ticks on both axes at every segment start; lines across the mask too while cells are
    at least 3 pixels wide, so they never hide a cell."""
    for start in starts[1:]:
        at = start // block * scale
        draw.line((LEFT + at, TOP - 6, LEFT + at, TOP - 1), fill=BOUNDARY)
        draw.line((LEFT - 6, TOP + at, LEFT - 1, TOP + at), fill=BOUNDARY)
        if scale >= 3:
            draw.line((LEFT + at, TOP + at, LEFT + at, TOP + side - 1), fill=BOUNDARY)
            draw.line((LEFT, TOP + at, LEFT + at, TOP + at), fill=BOUNDARY)
