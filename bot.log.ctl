echo1
