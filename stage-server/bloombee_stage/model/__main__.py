from bloombee_stage.model.loading import main

main()
