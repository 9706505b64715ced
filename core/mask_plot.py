"""The T-LoRA rank mask drawn as a heatmap (PIL + torch, no ComfyUI), plus the same numbers as text.

Rows are ranks (rank 0 at the bottom), columns are timesteps 0..1000 left to right; a cell is lit
when that rank is active at that timestep for the first alpha. Every alpha's r(t) is outlined just
above its lit region (the first alpha's outline never covers a lit cell, so the lit cells of a
column count r(t) exactly); the sampler's steps are red vertical lines with their index on top.
`PlotArea` says where the heatmap lies, so tests (and the web widget later) can map pixels back
to (timestep, rank). All values come from `core.tlora`, the one copy of the formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .tlora import T_MAX, active_rank, active_ranks, check_params

BACKGROUND = (30, 31, 36)
TEXT = (228, 228, 232)
FRAME = (130, 132, 140)
UNLIT = (52, 56, 66)
LIT = ((238, 176, 60), (222, 160, 46))  # alternating rank rows (when tall enough to tell ranks apart)
PRIMARY_CURVE = (255, 255, 255)
COMPARE_CURVES = ((80, 200, 255), (230, 110, 255), (120, 225, 110), (175, 175, 255))
STEP = (240, 60, 60)
MAX_ALPHAS = 1 + len(COMPARE_CURVES)
_CURVE_RADIUS = 2  # outline thickness in pixels


@dataclass(frozen=True)
class Schedule:
    """The sampler steps to mark: integer timesteps (one per step), their sigmas, a legend label."""

    timesteps: tuple[int, ...]
    sigmas: tuple[float, ...] | None = None
    label: str = "sampler steps"

    def __post_init__(self):
        if self.sigmas is not None and len(self.sigmas) != len(self.timesteps):
            raise ValueError(f"schedule: {len(self.sigmas)} sigmas for {len(self.timesteps)} timesteps")


@dataclass(frozen=True)
class PlotArea:
    """Where the heatmap lies in the image; x and y below are relative to (left, top)."""

    left: int
    top: int
    width: int
    height: int
    rank: int
    T: int = T_MAX

    def timestep_at(self, x: int) -> int:
        """The timestep shown by pixel column x (0 at the left edge, T at the right)."""
        return round(x * self.T / (self.width - 1))

    def x_of(self, t: float) -> int:
        """The pixel column of timestep t (clamped to 0..T)."""
        return round(min(max(t, 0), self.T) * (self.width - 1) / self.T)

    def rank_at(self, y: int) -> int:
        """The rank index shown by pixel row y (rank 0 is the bottom row)."""
        return ((self.height - 1 - y) * self.rank) // self.height

    def lit_pixels(self, r: int) -> int:
        """How many pixel rows of a column are lit when r ranks are active."""
        return min(self.height, -(-r * self.height // self.rank))


@dataclass(frozen=True)
class MaskPlot:
    """The rendered heatmap (IMAGE tensor [1, H, W, 3], 0..1), its text table and geometry."""

    image: torch.Tensor
    table: str
    area: PlotArea


def fonts(width: int, height: int) -> tuple[ImageFont.FreeTypeFont, ImageFont.FreeTypeFont]:
    """Pillow's built-in font (no font file needed) sized to the image: body and title."""
    size = max(10, min(width, height) // 36)
    return ImageFont.load_default(size=size), ImageFont.load_default(size=round(size * 1.2))


def _text_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, _, right, bottom = font.getbbox(text)
    return right - left, bottom


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    return _text_size(font, "Ag(|")[1] + 2


def legend_entries(rank: int, min_rank: int, alphas: Sequence[float],
                   schedule: Schedule | None) -> list[tuple[str, tuple, str]]:
    """(kind, colour, text) of each legend item; kind is 'swatch', 'line' or 'step'."""
    entries = [("swatch", LIT[0], f"active rank (alpha {alphas[0]:g}); rank 0 at the bottom"),
               ("line", PRIMARY_CURVE, f"r(t), alpha {alphas[0]:g}")]
    for alpha, colour in zip(alphas[1:], COMPARE_CURVES, strict=False):
        entries.append(("line", colour, f"r(t), alpha {alpha:g}"))
    if schedule is not None:
        entries.append(("step", STEP, schedule.label))
    return entries


def _flow(entries, font, max_width: int) -> list[list[tuple[int, tuple]]]:
    """Legend entries packed into lines: each line is a list of (width, entry)."""
    key = _line_height(font)
    lines: list[list[tuple[int, tuple]]] = [[]]
    used = 0
    for entry in entries:
        w = key * 2 + 6 + _text_size(font, entry[2])[0] + key
        if lines[-1] and used + w > max_width:
            lines.append([])
            used = 0
        lines[-1].append((w, entry))
        used += w
    return lines


def layout(width: int, height: int, rank: int, header: int, schedule: Schedule | None) -> PlotArea:
    """The plot area left after the header (title + legend, `header` pixels), step labels, ticks and titles."""
    font, _ = fonts(width, height)
    line = _line_height(font)
    pad = line // 2 + 4
    tick_w = _text_size(font, str(rank))[0]
    left = pad + line + pad + tick_w + 10
    right = pad + _text_size(font, str(T_MAX))[0] // 2 + 2
    top = pad + header + pad + (line + 8 if schedule else 0)
    bottom = 8 + line + pad // 2 + line + pad
    area = PlotArea(left, top, width - left - right, height - top - bottom, rank)
    if area.width < 64 or area.height < 32:
        raise ValueError(f"width/height: {width}x{height} leaves no room for the plot; make the image larger")
    return area


def lit_mask(area: PlotArea, rank: int, min_rank: int, alpha: float) -> torch.Tensor:
    """Bool (height, width): pixel lit when its row's rank is active at its column's timestep."""
    cols = active_ranks([area.timestep_at(x) for x in range(area.width)], rank, min_rank, alpha)
    rows = torch.tensor([area.rank_at(y) for y in range(area.height)])
    return rows[:, None] < cols[None, :]


def _outline(lit: torch.Tensor) -> torch.Tensor:
    """Pixels within _CURVE_RADIUS of a lit pixel but not lit: the curve r(t) drawn above the region."""
    k = 2 * _CURVE_RADIUS + 1
    grown = F.max_pool2d(lit.float()[None, None], k, stride=1, padding=_CURVE_RADIUS)[0, 0] > 0
    return grown & ~lit


def heatmap_pixels(area: PlotArea, rank: int, min_rank: int, alphas: Sequence[float]) -> torch.Tensor:
    """uint8 (height, width, 3): lit cells of alphas[0], then every alpha's outline on top."""
    primary = lit_mask(area, rank, min_rank, alphas[0])
    banded = area.height >= 3 * area.rank  # shade alternate ranks only when each spans a few pixel rows
    row_parity = torch.tensor([area.rank_at(y) % 2 if banded else 0 for y in range(area.height)])
    lit_colour = torch.tensor(LIT, dtype=torch.uint8)[row_parity][:, None, :]
    pixels = torch.tensor(UNLIT, dtype=torch.uint8).expand(area.height, area.width, 3)
    pixels = torch.where(primary[..., None], lit_colour, pixels).clone()
    for alpha, colour in zip(alphas[1:], COMPARE_CURVES, strict=False):
        pixels[_outline(lit_mask(area, rank, min_rank, alpha))] = torch.tensor(colour, dtype=torch.uint8)
    pixels[_outline(primary)] = torch.tensor(PRIMARY_CURVE, dtype=torch.uint8)
    return pixels


def _nice_step(span: float, pixels: float, min_gap: float, choices: Sequence[int]) -> int:
    """The smallest step of `choices` whose ticks are at least min_gap pixels apart."""
    for step in choices:
        if step * pixels / span >= min_gap:
            return step
    return choices[-1]


def _draw_axes(draw: ImageDraw.ImageDraw, area: PlotArea, font) -> None:
    """Frame, timestep ticks below, rank ticks on the left."""
    line = _line_height(font)
    x0, y0, x1, y1 = area.left, area.top, area.left + area.width, area.top + area.height
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=FRAME)
    step = _nice_step(T_MAX, area.width, _text_size(font, "1000")[0] + line, (50, 100, 200, 250, 500, 1000))
    for t in range(0, T_MAX + 1, step):
        x = x0 + area.x_of(t)
        draw.line((x, y1 + 1, x, y1 + 5), fill=FRAME)
        draw.text((x, y1 + 7), str(t), font=font, fill=TEXT, anchor="mt")
    choices = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000, 2000, area.rank)
    rstep = _nice_step(area.rank, area.height, line * 1.6, choices)
    values = list(range(0, area.rank + 1, rstep))
    if values[-1] != area.rank:
        if (area.rank - values[-1]) * area.height / area.rank < line:
            values.pop()
        values.append(area.rank)
    for v in values:
        y = y1 - area.lit_pixels(v)
        draw.line((x0 - 6, y, x0 - 2, y), fill=FRAME)
        draw.text((x0 - 8, y), str(v), font=font, fill=TEXT, anchor="rm")


def _draw_axis_titles(image: Image.Image, area: PlotArea, font) -> None:
    """Timestep title under the ticks, rank title rotated along the left edge."""
    draw = ImageDraw.Draw(image)
    line = _line_height(font)
    xt = "timestep t  (0 = clean image ... 1000 = pure noise)"
    draw.text((area.left + area.width // 2, area.top + area.height + 10 + line), xt, font=font,
              fill=TEXT, anchor="mt")
    yt = "active ranks r(t)"
    w, h = _text_size(font, yt)
    label = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(label).text((0, 0), yt, font=font, fill=255)
    label = label.rotate(90, expand=True)
    y = area.top + (area.height - label.height) // 2
    image.paste(Image.new("RGB", label.size, TEXT), (line // 2 + 4, max(0, y)), label)


def title_lines(rank: int, min_rank: int, fonts_: tuple, max_width: int) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """The title on one line in the title font when it fits, else on two lines in the body font."""
    font, title_font = fonts_
    name, params = "T-LoRA rank mask", f"rank R = {rank}    min_rank = {min_rank}    T = {T_MAX}"
    one = f"{name}    {params}"
    if _text_size(title_font, one)[0] <= max_width:
        return [(one, title_font)]
    return [(name, title_font), (params.replace("    ", ",  "), font)]


def _draw_legend(draw: ImageDraw.ImageDraw, title: list, lines, font) -> None:
    line = _line_height(font)
    pad = line // 2 + 4
    y = pad
    for text, title_font in title:
        draw.text((pad, y), text, font=title_font, fill=TEXT)
        y += _line_height(title_font)
    for row in lines:
        x = pad
        for w, (kind, colour, text) in row:
            mid = y + line // 2
            if kind == "swatch":
                draw.rectangle((x, y + 2, x + 2 * line, y + line - 3), fill=colour)
            elif kind == "line":
                draw.rectangle((x, mid - 1, x + 2 * line, mid + 1), fill=colour)
            else:
                draw.line((x + line, y + 1, x + line, y + line - 2), fill=colour, width=2)
                draw.ellipse((x + line - 3, mid - 3, x + line + 3, mid + 3), fill=colour)
            draw.text((x + 2 * line + 6, mid), text, font=font, fill=TEXT, anchor="lm")
            x += w
        y += line


def _draw_steps(draw: ImageDraw.ImageDraw, area: PlotArea, schedule: Schedule, curve: Sequence[int], font) -> None:
    """A red line per sampler step, a dot where it meets r(t), and step indices above the plot.

    Indices are written greedily from step 0 on, skipping any that would overlap one already written.
    """
    y0, y1 = area.top, area.top + area.height - 1
    taken: list[tuple[int, int]] = []
    for i, (t, r) in enumerate(zip(schedule.timesteps, curve, strict=True)):
        x = area.left + area.x_of(t)
        draw.line((x, y0, x, y1), fill=STEP)
        y = area.top + area.height - area.lit_pixels(r)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=STEP, outline=BACKGROUND)
        draw.line((x, y0 - 7, x, y0 - 2), fill=STEP, width=2)
        w = _text_size(font, str(i))[0]
        span = (x - w // 2 - 2, x + w // 2 + 2)
        if all(span[1] < a or span[0] > b for a, b in taken):
            taken.append(span)
            draw.text((x, y0 - 8), str(i), font=font, fill=STEP, anchor="mb")


def table_rows(schedule: Schedule | None) -> list[tuple]:
    """(step, sigma, t) per row: each sampler step, or t = 0, 50, ..., 1000 without a schedule."""
    if schedule is None:
        return [(None, None, t) for t in range(0, T_MAX + 1, 50)]
    sigmas = schedule.sigmas or (None,) * len(schedule.timesteps)
    return [(i, s, t) for i, (s, t) in enumerate(zip(sigmas, schedule.timesteps, strict=True))]


def format_table(rank: int, min_rank: int, alphas: Sequence[float], schedule: Schedule | None) -> str:
    """Fixed-width text: one row per step (or plotted timestep) with the active rank per alpha."""
    head = ["step", "sigma", "t"] + [f"r(alpha={a:g})" for a in alphas]
    rows = []
    for step, sigma, t in table_rows(schedule):
        rows.append(["-" if step is None else str(step), "-" if sigma is None else f"{sigma:.6g}", str(t)]
                    + [str(active_rank(t, rank, min_rank, a)) for a in alphas])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = [f"# T-LoRA mask: rank R={rank}, min_rank={min_rank}, T={T_MAX}; active ranks are [0, r)"]
    if schedule is not None:
        lines.append(f"# {schedule.label}")
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head] + rows]
    return "\n".join(lines)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """Alphas without repeats (first kept); ValueError when none or more than the colours we have."""
    unique = list(dict.fromkeys(float(a) for a in alphas))
    if not unique:
        raise ValueError("alpha: at least one alpha is needed")
    if len(unique) > MAX_ALPHAS:
        raise ValueError(f"compare_alphas: at most {MAX_ALPHAS - 1} extra alphas can be drawn, got {len(unique) - 1}")
    return unique


def render_mask_plot(rank: int, min_rank: int, alphas: Sequence[float], schedule: Schedule | None = None,
                     width: int = 768, height: int = 512) -> MaskPlot:
    """The heatmap of the T-LoRA mask for `alphas[0]`, r(t) of every alpha, and the sampler steps."""
    alphas = check_alphas(alphas)
    for alpha in alphas:
        check_params(rank, min_rank, alpha)
    font, title_font = fonts(width, height)
    pad = _line_height(font) // 2 + 4
    title = title_lines(rank, min_rank, (font, title_font), width - 2 * pad)
    legend = _flow(legend_entries(rank, min_rank, alphas, schedule), font, width - 2 * pad)
    header = sum(_line_height(f) for _, f in title) + len(legend) * _line_height(font)
    area = layout(width, height, rank, header, schedule)
    image = Image.new("RGB", (width, height), BACKGROUND)
    image.paste(Image.fromarray(heatmap_pixels(area, rank, min_rank, alphas).numpy()), (area.left, area.top))
    draw = ImageDraw.Draw(image)
    _draw_axes(draw, area, font)
    _draw_axis_titles(image, area, font)
    _draw_legend(draw, title, legend, font)
    if schedule is not None:
        curve = active_ranks(schedule.timesteps, rank, min_rank, alphas[0]).tolist()
        _draw_steps(draw, area, schedule, curve, font)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return MaskPlot(pixels.float().div(255.0).unsqueeze(0), format_table(rank, min_rank, alphas, schedule), area)


def parse_alphas(text: str, field: str = "compare_alphas") -> list[float]:
    """Extra alphas from text such as "0.5, 2" (commas or spaces); ValueError naming `field` and a bad entry."""
    values = []
    for token in text.replace(",", " ").split():
        try:
            values.append(float(token))
        except ValueError:
            raise ValueError(f"{field}: '{token}' is not a number") from None
    return values
