from bloombee_stage.gateway.app import main

main()
