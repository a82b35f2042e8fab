"""Running the pipeline: the Prefect flow over the DVC stages (`flow`, `flow_workspace`,
`dvc_graph`), the local server and scheduled deployment (`scheduler`, `schedule.yaml`), one run
per workspace (`workspace`) and process groups that leave nothing behind (`processes`,
`supervise`)."""
