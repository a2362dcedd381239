-- wrk script: POST a client message with a fresh messageId on every request,
-- spread over many conversations as real traffic is. A message is about 230
-- bytes, with a small payload object.
-- Arguments (after --): token, run id, conversations.
local token, run, conversations
local counter = 0
local thread_no = 0

function setup(thread)
  thread:set("tid", thread_no)
  thread_no = thread_no + 1
end

function init(args)
  token = args[1]
  run = args[2]
  conversations = tonumber(args[3] or "1000")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  counter = counter + 1
  local c = (counter * 7919) % conversations
  local body = string.format(
    '{"userId":"user-%d","conversationId":"conv-%d","messageId":"%s-%d-%d","type":"text",' ..
    '"text":"hello, this is test message %d","payload":{"text":"hello, this is test message %d","locale":"en-GB","channel":"web-chat"}}',
    c, c, run, tid, counter, counter, counter)
  return wrk.format(nil, nil, nil, body)
end
