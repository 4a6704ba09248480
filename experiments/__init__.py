"""The work behind `dli experiment`, one idea a module.

`presets` holds the paper's grids; `grid` parses and checks grid documents and plans a grid's
runs; `aggregate` reads run folders back and computes statistics over seeds; `run` trains,
resumes or skips each run of a grid; `report` writes an experiment folder's summary (Markdown,
CSV, plots). Each module imports only those before it in that list; the command (`dli.experiment`)
sits on top. Nothing is re-exported here: import from the module that holds a name.
"""
