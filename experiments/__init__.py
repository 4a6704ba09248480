"""The work behind `dli experiment`: `presets` holds the paper's grids.

Nothing is re-exported here: import from the module that holds a name.
"""
