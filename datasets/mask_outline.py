"""COCO segmentations of pixel masks that rasterize back to exactly those pixels (pycocotools' frPyObjects and
decode): polygons along the pixels' edges, or uncompressed RLE for a mask with holes, which COCO's polygons (a
union of filled outlines) cannot hold. Needs numpy only."""
from collections import defaultdict

import numpy as np

# the four sides of pixel (row r, column c) as (neighbour row offset, neighbour column offset, edge start, edge end),
# corners as (x, y) offsets from the pixel's top-left corner (c, r); each edge runs clockwise on screen (y down),
# so the pixel lies on the right of its direction of travel
_SIDES = (
    (-1, 0, (0, 0), (1, 0)),  # top, left to right
    (0, 1, (1, 0), (1, 1)),   # right, downwards
    (1, 0, (1, 1), (0, 1)),   # bottom, right to left
    (0, -1, (0, 1), (0, 0)),  # left, upwards
)


def _boundary_edges(mask):
    """{start corner (x, y): [end corners]} of the unit edges between a mask pixel and a pixel outside the mask (or
    the image border), each directed with the mask on its right."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    edges = defaultdict(list)
    for d_row, d_col, (x0, y0), (x1, y1) in _SIDES:
        neighbour = padded[1 + d_row:1 + d_row + height, 1 + d_col:1 + d_col + width]
        rows, cols = np.nonzero(mask & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges[(c + x0, r + y0)].append((c + x1, r + y1))
    return edges


def _turn_preference(direction):
    """Directions to leave a corner in, best first, after arriving in ``direction`` (dx, dy): right turn, straight
    on, left turn. Turning right first keeps pixels that touch only at a corner in separate outlines."""
    dx, dy = direction
    return ((-dy, dx), (dx, dy), (dy, -dx))


def pixel_outlines(mask):
    """The closed outlines of a boolean mask [H, W] along its pixels' edges, as lists of corner points (x, y) in
    pixel-edge coordinates (pixel (r, c) spans x in [c, c + 1], y in [r, r + 1]), straight runs merged. Outlines go
    clockwise on screen around each 4-connected part of the mask and anticlockwise around each hole."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"pixel_outlines: expected a 2-d mask, got shape {mask.shape}")
    edges = _boundary_edges(mask)
    outlines = []
    while edges:
        start = min(edges)
        first = edges[start].pop()
        if not edges[start]:
            del edges[start]
        points, previous, corner = [start], start, first
        while True:
            direction = (corner[0] - previous[0], corner[1] - previous[1])
            candidates = list(edges.get(corner, ()))
            if corner == start:
                candidates.append(first)  # the outline may close here, or pass through a shared corner
            step = next(d for d in _turn_preference(direction)
                        if (corner[0] + d[0], corner[1] + d[1]) in candidates)
            following = (corner[0] + step[0], corner[1] + step[1])
            if step != direction:
                points.append(corner)
            if corner == start and following == first:
                break
            edges[corner].remove(following)
            if not edges[corner]:
                del edges[corner]
            previous, corner = corner, following
        if points[0] == points[-1]:  # the start corner was reached again as a corner
            points.pop()
        if len(points) > 1 and _is_straight(points[-1], points[0], points[1]):
            points.pop(0)  # the start lies on a straight run
        outlines.append(points)
    return outlines


def _is_straight(before, corner, after):
    return (corner[0] - before[0]) * (after[1] - corner[1]) == (corner[1] - before[1]) * (after[0] - corner[0])


def signed_area(points):
    """Shoelace area of a closed outline in image coordinates: positive when it runs clockwise on screen."""
    xs = np.asarray([p[0] for p in points], dtype=np.int64)
    ys = np.asarray([p[1] for p in points], dtype=np.int64)
    return int(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys)) // 2


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of a boolean mask [H, W]: {"size": [H, W], "counts": run lengths}, column by column
    (Fortran order), starting with a run of background (0 when the first pixel is in the mask)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def coco_segmentation(mask):
    """The COCO segmentation of a non-empty boolean mask [H, W] that rasterizes to exactly its pixels: one polygon
    [x0, y0, x1, y1, ...] per 4-connected part, or uncompressed RLE when the mask has a hole."""
    outlines = pixel_outlines(mask)
    if not outlines:
        raise ValueError("coco_segmentation: the mask is empty")
    if any(signed_area(points) < 0 for points in outlines):
        return uncompressed_rle(mask)
    return [[int(v) for point in points for v in point] for points in outlines]
