"""
What prepare_data.py's geometry teacher says about a phantom grid (embedded/phantom.py): the answer, the
reasoning chain and the closed-ended choices of the four grid questions, from the case's meta.drawn alone.
  walk   the 3 x 3 walk (--walk-hops): one step per move, the answer the cell it ends in
  cell   one walk-grid lesion's brightness (one step: the answer)
  order  three numbers reordered by each lesion read row by row (--order-hops): one step per lesion, the
         answer the order reached, leading with its first number
  look   one order-grid lesion's size and brightness (one step: the answer)
"""
from itertools import permutations

from embedded.phantom import CELLS, LOOKS, S3_SAYS, cell_name

TYPES = ("walk", "cell", "order", "look")


def at(cell):
    """A cell's name -> its (row, column)."""
    return next(x for x in CELLS if cell_name(x) == cell)


def cell_answer(drawn, cell):
    r, c = at(cell)
    return f"The lesion in the {cell} cell is {drawn['grid'][r][c]} than its surroundings."


def look_answer(drawn, cell):
    r, c = at(cell)
    return f"The lesion in the {cell} cell is {drawn['sizes'][r][c]} and {drawn['grid'][r][c]} than its surroundings."


def order_answer(order):
    """The order reached, leading with its first number: lm_head(h_K) predicts the answer's first token (eq. 2), so
    the first number is read off the last latent state itself; "The numbers stand in the order ..." made it the
    eighth token, read through the cache instead (docs/tuning-log.md, 2026-12-07)."""
    return f"{', '.join(order)}."


def order_chain(drawn):
    """One step per lesion read: its cell, its look, what that does to the order, and the order it leaves, said as
    its first and last number (every state names all three numbers, so its order is in where they stand:
    pipeline/text_window.py scores the content words in order). Step N is the order the answer states; there is
    no closing step (it made each step decide whether it was the last: docs/tuning-log.md, 2026-12-06 night)."""
    steps = []
    for cell, (r, c), after in zip(drawn["read"], CELLS, drawn["path"][1:]):
        look = (drawn["sizes"][r][c], drawn["grid"][r][c])
        steps.append(f"The lesion in the {cell} cell is {look[0]} and {look[1]} than its surroundings, so "
                     f"{S3_SAYS[LOOKS.index(look)]}, which leaves {after[0]} first and {after[-1]} last.")
    return steps


def walk_answer(cell):
    return f"The walk ends in the {cell} cell."


def walk_chain(drawn):
    """One step per move: the lesion the walk stands on, what it shows, where it sends the walk. The moves are
    worded 'across' and 'down' (the gate judges left/right/upper/lower said of a lesion as its position)."""
    grid, path = drawn["grid"], drawn["path"]
    steps = []
    for here, there in zip(path, path[1:]):
        r, c = at(here)
        move = "across" if grid[r][c] == "darker" else "down"
        steps.append(f"The lesion in the {here} cell is {grid[r][c]} than its surroundings, so move one cell "
                     f"{move} to the {there} cell.")
    return steps


def teach(qtype, drawn, cell):
    """-> (answer, reasoning chain) of a grid question; `cell` is the cell a cell or look question asks about."""
    if qtype == "cell":  # one step: the answer itself
        answer = cell_answer(drawn, cell)
        return answer, [answer]
    if qtype == "look":
        answer = look_answer(drawn, cell)
        return answer, [answer]
    if qtype == "order":  # as many steps as lesions read
        return order_answer(drawn["path"][-1]), order_chain(drawn)
    return walk_answer(drawn["path"][-1]), walk_chain(drawn)  # as many steps as moves


def choices(qtype, drawn, cell, rng):
    """-> (choices, answer_index) of a grid question (§B.4): every brightness, look, order or end cell; the order
    and walk options are shuffled with the sample's own `rng` (random.Random)."""
    if qtype == "cell":  # darker or brighter
        options = [cell_answer(dict(drawn, grid=[[b] * 3] * 3), cell) for b in ("darker", "brighter")]
        return options, options.index(cell_answer(drawn, cell))
    if qtype == "look":  # the four looks
        options = [look_answer(dict(drawn, sizes=[[z] * 3] * 3, grid=[[b] * 3] * 3), cell) for z, b in LOOKS]
        return options, options.index(look_answer(drawn, cell))
    if qtype == "order":  # the six orders
        true, options = order_answer(drawn["path"][-1]), [order_answer("".join(o)) for o in permutations("123")]
    else:  # the walk: the nine cells
        true, options = walk_answer(drawn["path"][-1]), [walk_answer(cell_name(c)) for c in CELLS]
    rng.shuffle(options)
    return options, options.index(true)
