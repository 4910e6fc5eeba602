"""The gateway's side of the data plane: the OpenAI HTTP API over a generation engine that drafts,
batches and routes steps through the stages. Never imports the stage server.

    python -m bloombee_stage.gateway --model SOURCE --stages URL,URL --served-model-name NAME
"""
