"""The local web UI (`python -m pipeline ui`): pages over the same TOML files and run folders the CLI uses.

- server.py   binding, the access token, uvicorn
- app.py      the Starlette routes
- project.py  a config file as the form edits it (tomlkit keeps the user's comments); checks by load_config
- runs.py     jobs (cache then train in a subprocess), stop, and progress read from the run's own files
- job.py      the subprocess: `python -m pipeline cache`, then `train`, its log and exit status
- pages.py    the HTML (server-rendered; static/ui.js polls progress)

Nothing here is state of its own but the job records (which subprocess ran which config): the config is
the TOML file, a run is its train.output_dir.
"""
