from bloombee_stage.gateway.server import main

main()
