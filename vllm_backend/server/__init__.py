"""The API front end of a BD3 server: the fate of every request field, validation, trajectories and weight
routes over HTTP, and `bd3 serve`."""
