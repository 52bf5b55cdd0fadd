"""Several engine instances behind one front end, on Ray (`ferry serve --instances N`): instance.py is the Ray
actor that owns one engine; frontend.py is the engine the server talks to, which dispatches requests to the
instances and resumes the requests of an instance that dies on the others."""
