from bloombee_stage.stage.server import main

main()
